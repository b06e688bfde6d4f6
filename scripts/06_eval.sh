#!/usr/bin/env bash
# Step 6: evaluate the sft and ppo exports (and the majority baseline) on the test split, then the HTML viewer.
#   RRG_HOME=~/rrg bash scripts/06_eval.sh iu_xray     (DEVICE=cuda by default; DEVICE=cpu to force CPU)
. "$(dirname "$0")/lib/common.sh"
need_data
need_export sft 04_sft.sh
check_inputs
python -m rlhf_rrg.evaluate_run --run-root "$RUN_ROOT" --split test --num-beams "$RRG_NUM_BEAMS" \
  --max-new-tokens "$RRG_MAX_NEW_TOKENS" --device "${DEVICE:-cuda}" "${DATA_ARGS[@]}" "${EXTRA[@]}"
python -m rlhf_rrg.viewer --run-root "$RUN_ROOT" --out "$RUN_ROOT/eval/viewer.html"
