#!/usr/bin/env bash
# The newest versions that pyproject.toml's ranges allow, tried by a maintainer (not by CI: someone else's release
# must not turn CI red). It
#   1. installs them into a temporary virtual environment: `pip install --upgrade -e ".[test]"`, no lock;
#   2. prints the versions it used of the packages we lean on, and every difference from requirements/lock.txt;
#   3. runs a quick subset: the guard test and the kernel tests, `import transformers, dsunlearn.kernels` and
#      `python -m dsunlearn make-demo --help` from the checkout root and from another folder, and a 5-step demo
#      through launch.sh;
#   4. prints a summary and exits 1 if anything failed (2 if the install itself failed).
#
#   bash tools/check_newest.sh
#   CHECK_NEWEST_TORCH=torch bash tools/check_newest.sh        # the newest torch too
#
# CHECK_NEWEST_TORCH: what pip is asked for torch. Default: the lock's pin (torch==2.13.0): any other torch on Linux
#   comes from PyPI as a multi-GB CUDA build (pip's own configuration still applies, e.g. a constraint file).
# CHECK_NEWEST_PYTHON: the interpreter of the temporary environment (default python3).
#
# It works on a copy of the checkout's files (tracked and untracked, not ignored) in a temporary folder, because an
# editable install writes dsunlearn.egg-info and the demo writes outputs/ into the checkout: the copy's root stands
# for the checkout root. Everything lives under one mktemp folder, removed on exit.
# When it fails: the diff against the lock says which packages moved; read the failing step's output, then fix our
# code, or give the package an upper bound in pyproject.toml with the reason in a comment; then refresh the lock
# (the command at the top of requirements/lock.txt, with --upgrade) and run .ci/run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements/lock.txt"
python_base="${CHECK_NEWEST_PYTHON:-python3}"
torch_spec="${CHECK_NEWEST_TORCH:-$(grep -m 1 -o '^torch==[^ ;]*' "$lock")}"

work="$(mktemp -d "${TMPDIR:-/tmp}/check_newest.XXXXXX")"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
src="$work/checkout"
elsewhere="$work/elsewhere"
venv="$work/venv"
logs="$work/logs"
mkdir -p "$src" "$elsewhere" "$logs"

# The checkout's files, as git sees them (a file deleted in the working tree is skipped).
git -C "$root" ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' path; do [[ -e "$root/$path" ]] && printf '%s\0' "$path"; done \
  | tar -C "$root" --null -T - -cf - | tar -C "$src" -xf -

names=()
results=()
failed=0
# step NAME FOLDER COMMAND...: runs COMMAND in FOLDER, its output in a log; prints the log's tail (more on failure).
step() {
  local name="$1" folder="$2"
  shift 2
  local log="$logs/${#names[@]}.log" code=0 start=$SECONDS
  echo
  echo "=== $name  (in ${folder/#$work/\$tmp}: ${*@Q})"
  (cd "$folder" && "$@") >"$log" 2>&1 || code=$?
  if [[ $code -eq 0 ]]; then
    tail -n 5 "$log"
    results+=("ok      $name ($((SECONDS - start)) s)")
  else
    tail -n 60 "$log"
    echo "--- exit code $code"
    results+=("FAILED  $name (exit $code)")
    failed=1
  fi
  names+=("$name")
}

echo "check_newest: $("$python_base" --version 2>&1), torch asked as '$torch_spec', working in $work"
"$python_base" -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PYTHON="$venv/bin/python"  # launch.sh's interpreter
step "install the newest versions the ranges allow" "$src" \
  python -m pip install --disable-pip-version-check --upgrade --upgrade-strategy eager "$torch_spec" -e ".[test]"
if [[ $failed -ne 0 ]]; then
  echo
  echo "check_newest: FAILED: the newest versions do not install (see above)"
  exit 2
fi

echo
echo "=== versions used (pip freeze)"
python -m pip freeze --disable-pip-version-check 2>/dev/null \
  | grep -i -E '^(torch|deepspeed|transformers|kernels|peft|triton|datasets|accelerate|jsonargparse)(\[[^]]*\])?(==| @)' \
  || true
echo
echo "=== differences from requirements/lock.txt (for this Python and platform)"
python - "$lock" <<'EOF'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

locked = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    requirement = Requirement(line)
    if requirement.marker is None or requirement.marker.evaluate():
        locked[canonicalize_name(requirement.name)] = next(iter(requirement.specifier)).version
installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
installed.pop("dsunlearn", None)
for name in ("pip", "setuptools", "wheel"):  # the environment's own tools, not our dependencies
    if name not in locked:
        installed.pop(name, None)
same, absent = 0, []
for name in sorted(set(locked) | set(installed)):
    old, new = locked.get(name), installed.get(name)
    if old is not None and new is not None and Version(new).public == Version(old).public:
        same += 1
    elif new is None:
        absent.append(name)
    elif old is None:
        print(f"  {name}: {new}, not in the lock")
    else:
        print(f"  {name}: {old} -> {new}")
print(f"  ({same} packages as locked)")
if absent:
    # e.g. cuda-* and nvidia-*: only PyPI's CUDA build of torch asks for them.
    print(f"  in the lock, not installed here: {', '.join(absent)}")
EOF

step "guard test and kernel tests (checkout root)" "$src" \
  python -m pytest -q tests/test_import_names.py tests/kernels -p no:cacheprovider
for folder in "$src" "$elsewhere"; do
  where="checkout root"
  [[ "$folder" == "$src" ]] || where="another folder"
  step "import transformers, dsunlearn.kernels ($where)" "$folder" \
    python -c "import transformers, dsunlearn.kernels; print('transformers', transformers.__version__)"
  step "python -m dsunlearn make-demo --help ($where)" "$folder" python -m dsunlearn make-demo --help
done
step "5-step demo through launch.sh" "$src" bash launch.sh --demo harmful --train.max_steps 5

echo
echo "=== summary (torch asked as '$torch_spec'; versions and differences from the lock above)"
printf '  %s\n' "${results[@]}"
if [[ $failed -ne 0 ]]; then
  echo "check_newest: FAILED: see the failing step's output above and the differences from the lock"
  exit 1
fi
echo "check_newest: all passed with the newest versions the ranges allow"
