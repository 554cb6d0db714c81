#!/usr/bin/env bash
# The one command of the GPU check, as the device tool runs it from the repository root of a bare GPU machine:
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu_data"], timeout_s=480)
#
# 1. installs the carried wheels (.whl/, written here by bench/gpu_wheels.sh) into /tmp/site, without an index and
#    without dependencies (the machine can download nothing);
# 2. runs bench/gpu_check.py --device cuda with a time budget that keeps the whole call under GPU_CHECK_LIMIT_S
#    (default 450 s, inside the tool's 480 s), under `timeout` as a last resort;
# 3. leaves in $OUT: gpu_check.json (every number; rewritten after each section, so a stopped run keeps what it
#    measured), gpu_check.txt (the table), gpu_check.log (the whole output) and the register cases' overview PNGs.
#
# A failing sub-measurement is recorded in the JSON and the run goes on. Extra arguments go to gpu_check.py, e.g.
# `bash bench/gpu_check.sh --sections inference training`. Locally (no GPU): DEVICE=cpu bash bench/gpu_check.sh --quick
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LIMIT=${GPU_CHECK_LIMIT_S:-450}
SITE=${GPU_CHECK_SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONWARNINGS=ignore
LOG="$OUT/gpu_check.log"

say() { echo "$*" | tee -a "$LOG"; }
: >"$LOG"
say "gpu_check.sh: $(date -Is) on $(hostname), $("$PY" -V 2>&1) at $(command -v "$PY")"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu --format=csv,noheader 2>&1 |
  head -4 | tee -a "$LOG"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl 2>&1 |
    tail -5 | tee -a "$LOG"
  pip_rc=${PIPESTATUS[0]}
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  say "wheels into $SITE (pip exit $pip_rc): $(ls .whl | tr '\n' ' ')"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  say "no .whl/ here: using the packages already installed (see bench/README.md, 'GPU check')"
fi
if [ -d .gpu_data ]; then
  say "data: .gpu_data/ $(ls .gpu_data | tr '\n' ' ')"
else
  say "no .gpu_data/: the register case uses a synthetic pair"
fi

ELAPSED=$(($(date +%s) - START))
HARD=$((LIMIT - ELAPSED))      # gpu_check.py is killed after this
BUDGET=$((HARD - 25))          # ... and plans its sections to end this early (the table and JSON take a moment)
if [ "$BUDGET" -lt 60 ]; then
  say "gpu_check.sh: only $HARD s left after the setup; not starting"
  exit 1
fi

timeout -k 10 "$HARD" "$PY" bench/gpu_check.py --device "$DEVICE" --budget-s "$BUDGET" \
  --json "$OUT/gpu_check.json" --table "$OUT/gpu_check.txt" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "gpu_check.sh: gpu_check.py exited with $rc after $(($(date +%s) - START)) s in all; results in $OUT"
exit "$rc"
