#!/usr/bin/env bash
# Step 4: LLaVA-style SFT with LoRA and retrieved context -> runs/<dataset>/sft/export.
# RRG_LLM names the LLM (default qwen2.5-1.5b); RRG_LLM_PATH is its local folder (config.json + weights).
#   RRG_HOME=~/rrg RRG_LLM_PATH=~/models/Qwen2.5-1.5B ACCEL=zero2.yaml bash scripts/04_sft.sh iu_xray
. "$(dirname "$0")/lib/common.sh"
LLM=${RRG_LLM:-qwen2.5-1.5b}
[ -n "${RRG_LLM_PATH:-}" ] || fail "RRG_LLM_PATH is not set: the local folder of the $LLM weights"
need_data
need_export align 03_align.sh
need "$RRG_LLM_PATH/config.json" "the $LLM checkpoint folder (RRG_LLM_PATH)"
need_stage_config sft
check_inputs
launch_stage sft --run.init_from align --model.llm "$LLM" --model.llm_path "$RRG_LLM_PATH" \
  --prompting.views "$RRG_VIEWS"
