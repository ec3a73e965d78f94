#!/usr/bin/env bash
# Wheels for the offline GPU machine, downloaded here (where pip reaches the package registry) into kernels/wheels/.
#
#   kernels/gpu_wheels.sh [PYTHON_VERSION]        (default 3.12, the GPU machine's python3 as last seen; PIP=pip3)
#
# What the GPU machine lacks (kernels/gpu_check.sh installs all of it with pip --no-index --no-deps into a temporary
# --target directory on its PYTHONPATH; nothing is installed into its Python):
#   * the baselines of kernels/bench.py: liger-kernel and cut-cross-entropy (pure Python, Triton kernels);
#   * the step benchmark (python -m dsunlearn.tools.bench_step): deepspeed, built here from its sdist (pure Python: no op is
#     prebuilt, DeepSpeed compiles the ones it needs there with nvcc), its pydantic (pydantic-core is the one
#     compiled wheel, for PYTHON_VERSION on manylinux x86-64), hjson; jsonargparse with its [signatures] extra;
#     datasets with dill and multiprocess. torch, triton, transformers, numpy, pyyaml, psutil, msgpack, py-cpuinfo,
#     einops, ninja, tqdm and the rest are already there (/work/.library/device/KINDS.md).
# Versions are those of this checkout's environment where it has them, so the GPU runs the code the tests ran.
#
# kernels/wheels/ is git-ignored (kernels/.gitignore), so the device tool sends it only when asked: name it in
# `carry`, e.g. run(command="kernels/gpu_check.sh $OUT", carry=["kernels/wheels"]). About 6 MB.
set -euo pipefail

python_version=${1:-3.12}
pip=${PIP:-pip3}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
wheels="$repo/kernels/wheels"
mkdir -p "$wheels"

installed_version() {  # the version installed here, or nothing
    $pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'
}

pinned() {  # NAME -> NAME==VERSION where this environment has it, else NAME (the registry's newest)
    local version
    version=$(installed_version "$1")
    echo "$1${version:+==$version}"
}

download() {  # wheels only, for the GPU machine's Python and platform, without their dependencies
    $pip download --quiet --no-deps --only-binary=:all: -d "$wheels" --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 "$@"
}

download liger-kernel cut-cross-entropy
download "$(pinned pydantic)" "$(pinned annotated-types)" "$(pinned typing-inspection)" "$(pinned hjson)" \
    "$(pinned jsonargparse)" "$(pinned docstring-parser)" "$(pinned typeshed-client)" \
    "$(pinned datasets)" "$(pinned dill)" "$(pinned multiprocess)"
# pydantic pins the pydantic-core it was released with: take that one, not this environment's.
pydantic_wheel=$(ls "$wheels"/pydantic-[0-9]*.whl)
core_requirement=$(unzip -p "$pydantic_wheel" '*/METADATA' |
    sed -n 's/^Requires-Dist: pydantic[-_]core *\(==[^ ;]*\).*/pydantic-core\1/p')
download "${core_requirement:?no pydantic-core pin in $pydantic_wheel}"

# No wheel of deepspeed on the registry: build it from its sdist against this torch (its setup.py imports torch),
# with no op prebuilt (DS_BUILD_OPS=0, the default), which leaves a pure-Python wheel.
if ! ls "$wheels"/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 $pip wheel --quiet --no-deps --no-build-isolation -w "$wheels" "$(pinned deepspeed)"
fi

ls -l "$wheels"
du -sh "$wheels"
