#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): bf16 SFT and PPO steps of the real stages on the tiny LLM and
# on a 0.5B-shaped Qwen2 (peak memory, tokens/s), one SFT step under ZeRO-2 and one under ZeRO-3, and mamba-ssm's
# selective-scan kernel against ours (forward and backward) when mamba-ssm imports. One CUDA GPU, no downloads: every
# model is random-init and the data is synthetic.
#   bash scripts/gpu_check.sh [OUT] [gpu_check.py options]   # prints the table and writes it to OUT (gpu_check.md)
#   bash scripts/gpu_check.sh gpu_check.md --shapes tiny --checks sft,ppo
# The stages' output and every traceback go to OUT's .log. A wall-clock guard ends the whole run after
# GPU_CHECK_TIMEOUT_S (default 420 s, under the 8 minutes the check is given); no check starts after GPU_CHECK_BUDGET_S
# (default 330 s). A stopped run still leaves OUT with the rows it finished (the rest marked PENDING).
# Exit status: 0 when no row FAILED, 1 when one did, 124 when the guard stopped the run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${1:-gpu_check.md}
LOG=${OUT%.md}.log
TIMEOUT_S=${GPU_CHECK_TIMEOUT_S:-420}
BUDGET_S=${GPU_CHECK_BUDGET_S:-330}
mkdir -p "$(dirname "$OUT")"
rm -f "$OUT"
status=0
# timeout signals its whole process group: the accelerate launches of the ZeRO checks end with it.
timeout --kill-after 15 "$TIMEOUT_S" python benchmarks/gpu_check.py --out "$OUT" --budget-s "$BUDGET_S" "${@:2}" \
  >"$LOG" 2>&1 || status=$?
if [ -s "$OUT" ]; then
  cat "$OUT"
fi
case $status in
  0) ;;
  1) if grep -q "| FAILED |" "$OUT" 2>/dev/null; then
       echo "gpu_check.sh: a check FAILED (its traceback is in $LOG)" >&2
     else
       echo "gpu_check.sh: exit 1; the end of $LOG:" >&2
       tail -n 20 "$LOG" >&2
     fi ;;
  124 | 137) echo "gpu_check.sh: stopped by the ${TIMEOUT_S} s guard; unfinished rows are PENDING (log: $LOG)" >&2 ;;
  *)
    echo "gpu_check.sh: exit $status before the table was complete; the end of $LOG:" >&2
    tail -n 20 "$LOG" >&2
    ;;
esac
exit "$status"
