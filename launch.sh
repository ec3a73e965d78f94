#!/usr/bin/env bash
# One entry point for every place dsunlearn runs.
#
#   bash launch.sh                                   the embedded demo: tiny model + bundled data, 2 CPU ranks
#   bash launch.sh --demo harmful|copyright|hallucination [--train.lr ...]   one application's demo (default harmful)
#   bash launch.sh --config configs/X.yaml [--train.lr 2e-6 ...]     one node: all GPUs, else CPU ranks
#   bash launch.sh --nproc 4 --config ...            ranks on this node (GPUs or CPU processes); --nproc 1: one
#                                                    process, started without the deepspeed launcher
#   bash launch.sh --hostfile hosts --config ...     several nodes through the deepspeed launcher (ssh/pdsh)
#   bash launch.sh --hostfile hosts --node-rank N ...  this node's share only, no ssh: run once on every node
#   sbatch ... launch.sh --config ...                inside a SLURM allocation: srun, one task per GPU
#   bash launch.sh --dry-run ...                     print the command instead of running it
#
# Everything after the launcher's own flags goes to dsunlearn/train.py. SIGTERM or SIGINT to this script reaches
# every rank (they save the current step and exit 75); the script exits with the ranks' code.
set -euo pipefail
EXIT_USAGE=2  # dsunlearn/runtime/distributed.py

start_dir="$PWD"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="${PYTHON:-python3}"

usage_error() {
  echo "launch.sh: $*" >&2
  exit "$EXIT_USAGE"
}

dry_run=0
demo_name=""
nproc=""
hostfile=""
node_rank=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nproc) nproc="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --demo)
      [[ $# -ge 2 ]] || usage_error "--demo needs a name: harmful, copyright or hallucination"
      demo_name="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

# The project. sbatch runs a copy of this script from slurmd's spool folder, where nothing lies beside it: then the
# checkout is the submit folder (when it holds one) or the installed package's.
checkout=""
for candidate in "$here" "${SLURM_SUBMIT_DIR:-}"; do
  if [[ -n "$candidate" && -f "$candidate/dsunlearn/train.py" ]]; then
    checkout="$candidate"
    break
  fi
done
if [[ -n "$checkout" ]]; then
  project="$checkout"
  train_script=dsunlearn/train.py
else
  package_dir="$("$python_bin" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("dsunlearn").origin))' 2>/dev/null)" \
    || usage_error "cannot find dsunlearn: not beside this script ($here), not in SLURM_SUBMIT_DIR" \
                   "(${SLURM_SUBMIT_DIR:-unset}), and '$python_bin' cannot import it (set PYTHON or install the package)"
  project="$(dirname "$package_dir")"
  train_script="$package_dir/train.py"
fi

# Relative --config paths: from the folder this was started (or submitted) from, then from the project. The ranks
# run in the checkout (its configs name data and DeepSpeed files relative to it), else where this was started.
resolve_config() {
  local path="$1"
  if [[ "$path" != /* ]]; then
    if [[ -e "$start_dir/$path" ]]; then
      path="$start_dir/$path"
    elif [[ -e "$project/$path" ]]; then
      path="$project/$path"
    else
      usage_error "--config $path: no such file in $start_dir or $project"
    fi
  fi
  if [[ -n "$checkout" ]]; then
    path="${path#"$checkout"/}"
  fi
  echo "$path"
}
for i in "${!args[@]}"; do
  if [[ "${args[$i]}" == --config ]] && (( i + 1 < ${#args[@]} )); then
    args[i + 1]="$(resolve_config "${args[$i + 1]}")"
  elif [[ "${args[$i]}" == --config=* ]]; then
    args[i]="--config=$(resolve_config "${args[$i]#--config=}")"
  fi
done
if [[ -n "$checkout" ]]; then
  cd "$checkout"
fi

demo=0
if [[ ${#args[@]} -eq 0 && -z "$demo_name" ]]; then
  demo_name=harmful
fi
if [[ -n "$demo_name" ]]; then
  case "$demo_name" in
    harmful) demo_config=configs/demo.yaml; demo_dir=outputs/demo ;;
    copyright|hallucination) demo_config="configs/demo-$demo_name.yaml"; demo_dir="outputs/demo-$demo_name" ;;
    *) usage_error "--demo $demo_name: unknown demo; choose harmful, copyright or hallucination" ;;
  esac
  [[ -n "$checkout" ]] || usage_error "the demo needs the checkout; give --config FILE"
  demo=1
  # The demo starts afresh each time (a folder holding a run is otherwise refused); flags given after it override.
  args=(--config "$demo_config" --overwrite true "${args[@]}")
fi

gpu_count() {
  # Without GPU device files (NVIDIA's, or ROCm's /dev/kfd) torch sees no GPU: no interpreter importing torch to ask.
  if ! compgen -G "/dev/nvidia[0-9]*" >/dev/null && [[ ! -e /dev/kfd ]]; then
    echo 0
    return
  fi
  "$python_bin" - <<'EOF' 2>/dev/null || echo 0
import torch
print(torch.cuda.device_count() if torch.cuda.is_available() else 0)
EOF
}

# Who gets a stop request: under SLURM the job's steps (a SIGTERM to srun itself kills the tasks at once, before they
# can save); under the deepspeed launcher the rank processes (the runner dies on SIGTERM and leaves them running; its
# launch.py exits with the ranks' code once they are gone); with ssh/pdsh the runner, whose handler stops the nodes.
stop_target=ranks
stop_requested=0
forwarder=""
request_stop() {
  [[ $stop_requested -eq 1 ]] && return
  stop_requested=1
  case "$stop_target" in
    # In the background: when SLURM itself is ending the job (scancel, requeue, time limit) it has signalled the
    # ranks already, and scancel keeps retrying "job can not be altered now" until the job is gone.
    slurm) scancel --signal=TERM "$SLURM_JOB_ID" & forwarder=$! ;;
    runner) kill -TERM "$child" 2>/dev/null || true ;;
    ranks)
      # runner -> deepspeed.launcher.launch -> ranks
      local launchers ranks
      launchers="$(pgrep -P "$child" || true)"
      ranks="$(for pid in $launchers; do pgrep -P "$pid" || true; done)"
      if [[ -n "$ranks" ]]; then
        kill -TERM $ranks 2>/dev/null || true
      else  # no rank started yet: nothing to save
        kill -TERM $launchers "$child" 2>/dev/null || true
      fi
      ;;
  esac
}

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; echo
    return 0
  fi
  "$@" &
  child=$!
  trap request_stop TERM INT
  while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true  # a trapped signal ends `wait` early while the child runs on
  done
  local code=0
  wait "$child" || code=$?  # bash keeps the status of the child it reaped
  # A forwarding scancel still retrying must not outlive this attempt: after a requeue it would stop the next one.
  [[ -z "$forwarder" ]] || kill "$forwarder" 2>/dev/null || true
  trap - TERM INT
  return "$code"
}

gpus="$(gpu_count)"
if [[ -n "${SLURM_JOB_ID:-}" && -z "$hostfile" ]]; then
  # srun starts one task per GPU; each task reads its rank from SLURM's variables (the deepspeed launcher's
  # --launcher slurm needs mpi4py and sets no RANK, so it is not used).
  # All of scontrol's output is read: `| head -n 1` would make it die of SIGPIPE, and pipefail end this script.
  mapfile -t job_nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
  master_addr="${job_nodes[0]}"
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
  inner+=" MASTER_ADDR=$master_addr MASTER_PORT=$master_port; exec $(printf '%q %q' "$python_bin" "$train_script")"
  stop_target=slurm
  code=0
  # --kill-on-bad-exit=0 (whatever the site's KillOnBadExit): after a pre-emption the first rank to exit 75 would
  # have srun signal the others while they still save or exit, and they would die by that signal. A rank that fails
  # ends the others itself (dsunlearn/train.py).
  run "${cpu_env[@]}" srun --nodes "$nodes" --ntasks-per-node "$tasks_per_node" --kill-on-bad-exit=0 \
    bash -c "$inner \"\$@\"" bash "${args[@]}" || code=$?
  exit "$code"
fi

if [[ "$gpus" -gt 0 ]]; then
  launcher=(deepspeed)
else
  # No GPU: CPU ranks over gloo (DS_ACCELERATOR=cpu), one core each where the machine has them.
  export DS_ACCELERATOR=cpu
  launcher=(env DS_ACCELERATOR=cpu deepspeed)
fi
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || usage_error "--hostfile $hostfile: no such file"
  # DeepSpeed's own message for a host it cannot reach comes from ssh, after it started; ours names the line.
  hosts=()
  while read -r host _; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    getent hosts "$host" >/dev/null || usage_error "hostfile $hostfile names host '$host', which does not resolve" \
      "(no DNS or /etc/hosts entry): fix its name or remove that line"
    hosts+=("$host")
  done < "$hostfile"
  [[ ${#hosts[@]} -gt 0 ]] || usage_error "hostfile $hostfile names no host (lines: 'HOST slots=N')"
  launcher+=(--hostfile "$hostfile")
  [[ -n "$nproc" ]] && launcher+=(--num_gpus "$nproc")
  if [[ -n "$node_rank" ]]; then
    # One launcher per node, started by you (or your scheduler) on each with its rank: no ssh. They must agree on
    # the master, the first host, and on the port.
    launcher+=(--no_ssh --node_rank "$node_rank" --master_addr "${hosts[0]}")
  else
    stop_target=runner
  fi
  launcher+=(--master_port "${MASTER_PORT:-29500}")
else
  [[ -z "$node_rank" ]] || usage_error "--node-rank needs --hostfile"
  if [[ "$nproc" == 1 ]]; then
    # One process needs no launcher: the rank itself, with the variables the launcher would give it (as srun starts
    # ranks). The deepspeed runner and its launch.py are two more interpreters that import DeepSpeed before it.
    launcher=(env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
              "MASTER_PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}" "$python_bin")
    stop_target=runner  # the child is the rank
  elif [[ "$gpus" -gt 0 ]]; then
    launcher+=(--num_gpus "${nproc:-$gpus}" --master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}")
  else
    launcher+=(--num_gpus "${nproc:-2}" --master_port "${MASTER_PORT:-$((29500 + RANDOM % 1000))}")
  fi
fi

if [[ $demo -eq 1 ]]; then
  # A demo: build its "original" model once, unlearn it, evaluate it.
  if [[ ! -f "$demo_dir/original/config.json" ]]; then
    run "$python_bin" -m dsunlearn make-demo --application "$demo_name" --out "$demo_dir/original"
  fi
  run "${launcher[@]}" "$train_script" "${args[@]}"
  if [[ $dry_run -eq 0 ]]; then
    echo
    echo "demo finished ($demo_name): outputs in $checkout/$demo_dir"
    echo "  original model:  $demo_dir/original"
    echo "  unlearned model: $demo_dir/unlearned/final   metrics: $demo_dir/unlearned/metrics.jsonl"
    report="$demo_dir/unlearned/eval/report.md"
    if [[ -f $report ]]; then
      echo "  evaluation:      $report (eval.json, samples.jsonl, PNG plots beside it)"
      echo
      # The before/after table of the report.
      sed -n '/^## Metrics/,/^### Metric definitions/p' "$report" | sed '1d;$d'
    fi
  fi
  exit 0
fi
code=0
run "${launcher[@]}" "$train_script" "${args[@]}" || code=$?
exit "$code"
