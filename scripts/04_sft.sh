#!/usr/bin/env bash
# Step 4: LLaVA-style SFT with LoRA and retrieved context -> runs/<dataset>/sft/export.
# RRG_LLM_PATH is the local folder of any Hugging Face causal LM (config.json + weights + tokenizer); RRG_LLM names it
# (default qwen2.5-1.5b: a shortcut that also checks the folder holds that model; any other name, e.g. llama-3.1-8b,
# takes the folder as it is).
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
