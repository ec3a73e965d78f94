#!/usr/bin/env bash
# One entry point for every place dsunlearn runs.
#
#   bash launch.sh                                   the embedded demo: tiny model + bundled data, 2 CPU ranks
#   bash launch.sh --config configs/X.yaml [--train.lr 2e-6 ...]     one node: all GPUs, else CPU ranks
#   bash launch.sh --nproc 4 --config ...            ranks on this node (GPUs or CPU processes)
#   bash launch.sh --hostfile hosts --config ...     several nodes through the deepspeed launcher (ssh/pdsh)
#   sbatch ... launch.sh --config ...                inside a SLURM allocation: srun, one task per GPU
#   bash launch.sh --dry-run ...                     print the command instead of running it
#
# Everything after the launcher's own flags goes to dsunlearn/train.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

dry_run=0
nproc=""
hostfile=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nproc) nproc="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

python_bin="${PYTHON:-python3}"
demo=0
if [[ ${#args[@]} -eq 0 ]]; then
  demo=1
  args=(--config configs/demo.yaml)
fi

gpu_count() {
  "$python_bin" - <<'EOF' 2>/dev/null || echo 0
import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)
EOF
}

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

gpus="$(gpu_count)"
if [[ -n "${SLURM_JOB_ID:-}" && -z "$hostfile" ]]; then
  # srun starts one task per GPU; each task reads its rank from SLURM's variables (the deepspeed launcher's
  # --launcher slurm needs mpi4py and sets no RANK, so it is not used).
  master_addr="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
  master_port="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
  cpu_env=()
  if [[ "$gpus" -gt 0 ]]; then
    tasks_per_node="${nproc:-${SLURM_GPUS_ON_NODE:-$gpus}}"
  else
    cpu_env=(env DS_ACCELERATOR=cpu)
    tasks_per_node="${nproc:-${SLURM_NTASKS_PER_NODE:-2}}"
  fi
  nodes="${SLURM_JOB_NUM_NODES:-1}"
  inner="export RANK=\$SLURM_PROCID WORLD_SIZE=\$SLURM_NTASKS LOCAL_RANK=\$SLURM_LOCALID"
  inner+=" MASTER_ADDR=$master_addr MASTER_PORT=$master_port; exec $python_bin dsunlearn/train.py"
  run "${cpu_env[@]}" srun --nodes "$nodes" --ntasks-per-node "$tasks_per_node" --kill-on-bad-exit=1 \
    bash -c "$inner \"\$@\"" bash "${args[@]}"
  exit $?
fi

launcher=(deepspeed)
if [[ -n "$hostfile" ]]; then
  launcher+=(--hostfile "$hostfile")
  [[ -n "$nproc" ]] && launcher+=(--num_gpus "$nproc")
elif [[ "$gpus" -gt 0 ]]; then
  launcher+=(--num_gpus "${nproc:-$gpus}")
else
  # No GPU: CPU ranks over gloo (DS_ACCELERATOR=cpu), one core each where the machine has them.
  export DS_ACCELERATOR=cpu
  launcher=(env DS_ACCELERATOR=cpu deepspeed --num_gpus "${nproc:-2}")
fi
launcher+=(--master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}")

if [[ $demo -eq 1 ]]; then
  # The embedded default: build the demo's "original" model once, unlearn it, evaluate it.
  if [[ ! -f outputs/demo/original/config.json ]]; then
    run "$python_bin" -m dsunlearn make-demo --out outputs/demo/original
  fi
  run "${launcher[@]}" dsunlearn/train.py "${args[@]}"
  if [[ $dry_run -eq 0 ]]; then
    echo
    echo "demo finished: outputs in $here/outputs/demo"
    echo "  original model:  outputs/demo/original"
    echo "  unlearned model: outputs/demo/unlearned/final   metrics: outputs/demo/unlearned/metrics.jsonl"
    report=outputs/demo/unlearned/eval/report.md
    if [[ -f $report ]]; then
      echo "  evaluation:      $report (eval.json, samples.jsonl, PNG plots beside it)"
      echo
      # The before/after table of the report.
      sed -n '/^## Metrics/,/^Metrics:/p' "$report" | sed '1d;$d'
    fi
  fi
  exit 0
fi
run "${launcher[@]}" dsunlearn/train.py "${args[@]}"
