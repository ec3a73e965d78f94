#!/usr/bin/env bash
# GPU check of the fused loss on a CUDA machine with no network and the repository not installed:
# the GPU tests of the kernels, the kernel benchmark at Llama-3 sizes (N=16384, H=4096, V=128256, bf16) against
# Liger-Kernel and cut-cross-entropy, then the step benchmark (python -m dsunlearn.tools.bench_step --preset gpu).
#
#   kernels/gpu_check.sh OUT_DIR        (PYTHON=python3 by default)
#
# Needs torch, triton and pytest. The baselines and the step benchmark's packages travel as wheels in kernels/wheels/
# (made by kernels/gpu_wheels.sh on a machine with network; git-ignored, so carried explicitly, e.g. with the device
# tool: run(command="kernels/gpu_check.sh $OUT", carry=["kernels/wheels"])); they are installed with pip --no-index
# --no-deps into a temporary --target directory put on PYTHONPATH. Without them the Liger and CCE rows say "not
# installed" and the step benchmark's DeepSpeed rows are skipped or fail, recorded as such.
#
# Writes into OUT_DIR at most 8 files: env.txt (versions, the wheels' install, every step's exit code and time),
# pytest_gpu.txt, bench.txt (both kernel benchmarks' tables and logs), bench_both.json, bench_ce.json,
# bench_step.txt (its log), bench_step.json and bench_step.md. Every step has its own time limit (at most 8.7
# minutes in all, kills included); a failed step is recorded and the next one still runs.
set -uo pipefail

out_dir=${1:?usage: kernels/gpu_check.sh OUT_DIR}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

# The checkout itself on PYTHONPATH: dsunlearn/kernels/__init__.py adds this kernels/ folder to dsunlearn.kernels.
# Beside it, the carried wheels' --target.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
site="$scratch/site"
mkdir -p "$site"
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
cd "$out_dir"

status=0
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, append stdout+stderr to LOG, remember failures
    local name=$1 seconds=$2 log=$3
    shift 3
    local start=$SECONDS command="$*"
    echo "=== $name: ${command:0:400}" >>"$log"
    timeout --kill-after=5 "$seconds" "$@" >>"$log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out_dir/env.txt"
    [ "$rc" -eq 0 ] || status=1
}

: >"$out_dir/env.txt"
wheels=("$repo"/kernels/wheels/*.whl)
if [ -e "${wheels[0]}" ]; then
    step "wheels (${#wheels[@]})" 30 "$out_dir/env.txt" \
        "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "${wheels[@]}"
else
    echo "no kernels/wheels/*.whl: run kernels/gpu_wheels.sh where pip has network and carry kernels/wheels" \
        >>"$out_dir/env.txt"
fi

step "environment" 30 "$out_dir/env.txt" bash -c '
date -Is
echo "repo: $1 ($(git -C "$1" rev-parse --short HEAD 2>/dev/null || echo "no git"))"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
"$2" - <<"PYTHON"
import importlib.metadata, platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
from dsunlearn.kernels import triton_ce_kl
print("cuBLAS fp32 output for bf16 (mm, in-place addmm):", triton_ce_kl._cuda_supports_fp32_out(0))
for name in ("liger-kernel", "cut-cross-entropy", "deepspeed", "jsonargparse", "transformers", "datasets"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed")
PYTHON
' environment "$repo" "$python"

step "gpu tests" 90 "$out_dir/pytest_gpu.txt" \
    "$python" -m pytest "$repo/tests/kernels" -m gpu --noconftest -p no:cacheprovider -q -rs --durations=10

# The default chunk height is 1024 rows here; 512 and 2048 bracket it. `chunked` (the CPU backend, which casts a
# bf16 weight to fp32 block by block) is left out: hundreds of small products per call, minutes at this size.
step "bench ce+kl" 170 "$out_dir/bench.txt" \
    "$python" -m dsunlearn.kernels.bench --device cuda --dtype bf16 --n 16384 --h 4096 --v 128256 --terms both \
    --impls torch,triton,triton@512,triton@2048,liger,liger.chunked,cce,torch.compile --repeats 5 \
    --json "$out_dir/bench_both.json"

step "bench ce" 50 "$out_dir/bench.txt" \
    "$python" -m dsunlearn.kernels.bench --device cuda --dtype bf16 --n 16384 --h 4096 --v 128256 --terms ce \
    --impls torch,triton,liger,cce --repeats 5 --json "$out_dir/bench_ce.json"

# Its --out folder also keeps the runs (models, checkpoints): write it to scratch and bring back the two results.
step "bench step" 120 "$out_dir/bench_step.txt" \
    "$python" -m dsunlearn.tools.bench_step --preset gpu --out "$scratch/bench_step"
for result in bench_step.json bench_step.md; do
    [ -f "$scratch/bench_step/$result" ] && cp "$scratch/bench_step/$result" "$out_dir/"
done

echo "gpu_check: $([ "$status" -eq 0 ] && echo ok || echo 'FAILED steps above')" | tee -a "$out_dir/env.txt"
exit "$status"
