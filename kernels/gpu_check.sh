#!/usr/bin/env bash
# GPU check of the fused loss on a CUDA machine with no network and the repository not installed:
# the GPU tests of the kernels, then the benchmark at Llama-3 sizes (N=16384, H=4096, V=128256, bf16).
#
#   kernels/gpu_check.sh OUT_DIR        (PYTHON=python3 by default)
#
# Writes into OUT_DIR (at most 7 files): env.txt, pytest_gpu.txt, bench_both.{txt,json}, bench_ce.{txt,json}.
# Needs torch, triton and pytest; no deepspeed, jsonargparse or Liger. Every step has its own time limit so the
# whole script stays under 8 minutes; a failed step is recorded and the next one still runs.
set -uo pipefail

out_dir=${1:?usage: kernels/gpu_check.sh OUT_DIR}
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

# Import shim: a `dsunlearn` package whose `kernels` is the repository's kernels/ (as the installed package maps
# it) and whose other modules come from the repository's dsunlearn/.
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/dsunlearn"
ln -s "$repo/kernels" "$shim/dsunlearn/kernels"
cat >"$shim/dsunlearn/__init__.py" <<EOF
__path__.append("$repo/dsunlearn")
with open("$repo/dsunlearn/__init__.py") as _init:
    exec(compile(_init.read(), "$repo/dsunlearn/__init__.py", "exec"))
EOF
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
# Run from OUT_DIR: with the repository root as the working directory, `import dsunlearn` would find its
# dsunlearn/ (which has no kernels/) before the shim.
cd "$out_dir"

status=0
step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, log stdout+stderr, remember failures
    local name=$1 seconds=$2 log=$3
    shift 3
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" >"$log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out_dir/env.txt"
    [ "$rc" -eq 0 ] || status=1
}

{
    date -Is
    echo "repo: $repo ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$python" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
from dsunlearn.kernels import triton_ce_kl
print("cuBLAS fp32 output for bf16 (mm, in-place addmm):", triton_ce_kl._cuda_supports_fp32_out(0))
try:
    import deepspeed  # noqa: F401
    print("deepspeed importable (not needed)")
except ImportError:
    print("no deepspeed (as expected)")
EOF
} >"$out_dir/env.txt" 2>&1

step "gpu tests" 150 "$out_dir/pytest_gpu.txt" \
    "$python" -m pytest "$repo/tests/kernels" -m gpu --noconftest -p no:cacheprovider -q -rs --durations=10

step "bench ce+kl" 240 "$out_dir/bench_both.txt" \
    "$python" -m dsunlearn.kernels.bench --device cuda --dtype bf16 --n 16384 --h 4096 --v 128256 --terms both \
    --impls torch,triton,triton@384,triton@1536,chunked,liger,cce,torch.compile --repeats 5 --json "$out_dir/bench_both.json"

step "bench ce" 60 "$out_dir/bench_ce.txt" \
    "$python" -m dsunlearn.kernels.bench --device cuda --dtype bf16 --n 16384 --h 4096 --v 128256 --terms ce \
    --impls torch,triton,liger,cce --repeats 5 --json "$out_dir/bench_ce.json"

echo "gpu_check: $([ "$status" -eq 0 ] && echo ok || echo 'FAILED steps above')" | tee -a "$out_dir/env.txt"
exit "$status"
