#!/usr/bin/env bash
# The GPU check: the one command a session lent a GPU runs (docs/benchmarks.md, "GPU check").
#
#   here:    bash scripts/device_wheels.sh        # the wheels the GPU machine lacks, into .whl/
#   device:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   here:    bash scripts/gpu_check.sh --cpu-smoke   # every step at toy size on the CPU (the plumbing)
#
# Steps, each under `timeout` (the whole script ends within GPU_CHECK_BUDGET_S, default 530 s;
# a failing step does not stop the later ones), each writing its log into $OUT:
#   install     .whl/*.whl -> /tmp/site (the device README's recipe); PYTHONPATH = repo root + it
#   env         nvidia-smi, python, torch/CUDA, package versions against pyproject.toml   env.txt
#   cuda_tests  every test of tests/ whose skipif names torch.cuda.is_available()        cuda_tests.txt
#   demo        `p2pfm demo` (4 nodes, MiniLM, BBC News) on the GPU: devices, wall time,
#               accuracy per node, peak GPU memory                                       demo.txt, demo_report.md
#   overlap     4 nodes share the GPU, Llama-7B-shaped layers (as many as fit), LoRA r=16 on
#               every linear layer, 1 Gb/s links: overlap + sign1, then synchronous + none
#               if time allows; training-time fractions                                 overlap_gpu.txt
# summary.txt has every step's verdict and key lines, results.json the figures; both print at the end.
# Without $OUT (not on the device) the files go to a temporary folder, named at the start.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
T0=$(date +%s)
if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d /tmp/gpu-check-out.XXXXXX)
  echo "gpu_check: \$OUT is unset; the output files go to $OUT"
fi
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu-check-work.XXXXXX)  # runs and the random model; not returned
SUMMARY=$OUT/summary.txt
RESULTS=$OUT/results.json
: >"$SUMMARY"
rm -f "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$SMOKE" = 1 ]; then
  PY=$ROOT/.venv/bin/python
  SITE=/tmp/gpu-check-site
  BUDGET_S=${GPU_CHECK_BUDGET_S:-900}
  SMOKE_FLAG=(--smoke)
else
  PY=python3
  SITE=/tmp/site
  BUDGET_S=${GPU_CHECK_BUDGET_S:-530}
  SMOKE_FLAG=()
fi
DRIVER=("$PY" "$ROOT/benchmarks/gpu_check.py" --summary "$SUMMARY" --results "$RESULTS")
FAILED=()

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

# step NAME LIMIT_S LOG COMMAND...: COMMAND under timeout (LIMIT_S, or what is left), output to LOG
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local remain
  remain=$(($(left) - 10))
  ((limit > remain)) && limit=$remain
  if ((limit < 20)); then
    echo "step $name: SKIPPED (${remain} s left)" | tee -a "$SUMMARY"
    FAILED+=("$name")
    return
  fi
  echo "gpu_check: step $name (at most ${limit} s; log $log) at +$(($(date +%s) - T0)) s"
  echo "=== step $name: $* (at most ${limit} s) ===" >>"$log"
  local start rc verdict
  start=$(date +%s)
  timeout -k 20 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) verdict=PASS ;;
    124 | 137) verdict="TIMEOUT after ${limit} s" ;;
    *) verdict=FAIL ;;
  esac
  [ "$rc" = 0 ] || FAILED+=("$name")
  echo "step $name: $verdict (exit $rc, $(($(date +%s) - start)) s, $(basename "$log"))" | tee -a "$SUMMARY"
}

echo "gpu_check: mode $([ "$SMOKE" = 1 ] && echo 'CPU smoke' || echo GPU), budget ${BUDGET_S} s, out $OUT, work $WORK"

# a. install the carried wheels, exactly as the device README says (smoke: check that they install
#    for CPython 3.12, then put only the pure-Python ones beside the venv's 3.11)
WHEELS=(.whl/*.whl)
if [ ! -e "${WHEELS[0]}" ]; then
  echo "step install: FAIL (no .whl/*.whl: run scripts/device_wheels.sh here and carry .whl)" | tee -a "$SUMMARY"
  FAILED+=(install)
elif [ "$SMOKE" = 1 ]; then
  rm -rf "$SITE" "$SITE-pure"
  step install 120 "$OUT/env.txt" "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target "$SITE" --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any "${WHEELS[@]}"
  step install-pure 60 "$OUT/env.txt" "$PY" -m pip install -q --disable-pip-version-check --no-index \
    --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE-pure" .whl/*-py3-none-any.whl
  export PYTHONPATH=$ROOT:$SITE-pure
else
  step install 120 "$OUT/env.txt" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "${WHEELS[@]}"
  export PYTHONPATH=$ROOT:$SITE
fi
echo "PYTHONPATH=$PYTHONPATH" >>"$OUT/env.txt"

# b. the environment
step env 90 "$OUT/env.txt" "${DRIVER[@]}" env

# c. the CUDA tests: every test function under a skipif that names torch.cuda.is_available()
mapfile -t CUDA_TESTS < <(awk '
  /skipif\(.*torch\.cuda\.is_available\(\)/ { marked = 1; next }
  marked && /^(async )?def test_/ { match($0, /test_[A-Za-z0-9_]+/); print FILENAME "::" substr($0, RSTART, RLENGTH); marked = 0 }
' tests/*.py)
echo "CUDA tests found: ${CUDA_TESTS[*]}" >>"$OUT/cuda_tests.txt"
if [ "${#CUDA_TESTS[@]}" = 0 ]; then
  echo "step cuda_tests: FAIL (no test found by grep)" | tee -a "$SUMMARY"
  FAILED+=(cuda_tests)
else
  # -p no:p2pfm: the device has no installed p2pfm, so no pytest11 plugin; the smoke run matches it
  step cuda_tests 150 "$OUT/cuda_tests.txt" "$PY" -m pytest -p no:cacheprovider -p no:p2pfm -rA -v \
    "${CUDA_TESTS[@]}"
  grep -E "^(PASSED|FAILED|SKIPPED|ERROR) " "$OUT/cuda_tests.txt" | sed 's/^/  cuda_tests: /' >>"$SUMMARY"
fi

# d. the demo job: 4 node processes on the one GPU
step demo 210 "$OUT/demo.txt" "${DRIVER[@]}" demo --work "$WORK" --report-copy "$OUT/demo_report.md" \
  "${SMOKE_FLAG[@]}"

# e. issue 13 item 4: overlap + sign1 against synchronous + none on 1 Gb/s links, 4 nodes on the GPU
budget=$(($(left) - 25))
step overlap $((budget + 15)) "$OUT/overlap_gpu.txt" "${DRIVER[@]}" overlap --work "$WORK" \
  --budget-s "$budget" "${SMOKE_FLAG[@]}"

echo
echo "=== gpu_check summary ($([ "$SMOKE" = 1 ] && echo 'CPU smoke' || echo GPU), $(($(date +%s) - T0)) s) ==="
cat "$SUMMARY"
shown=" "
for name in "${FAILED[@]}"; do
  case $name in
    install | install-pure) log=env.txt ;;
    overlap) log=overlap_gpu.txt ;;
    *) log=$name.txt ;;
  esac
  [[ $shown == *" $log "* ]] && continue
  shown+="$log "
  [ -f "$OUT/$log" ] && { echo "--- last lines of $log ($name failed)"; tail -n 25 "$OUT/$log"; }
done
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then
  echo "work folder kept: $WORK"
else
  rm -rf "$WORK"
fi
[ "${#FAILED[@]}" = 0 ]
