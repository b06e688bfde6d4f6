#!/usr/bin/env bash
# All steps in order for one dataset; each step checks its own inputs and stops the chain with exit 2.
#   RRG_HOME=~/rrg RRG_LLM_PATH=~/models/Qwen2.5-1.5B ACCEL=zero2.yaml bash scripts/reproduce_all.sh iu_xray
. "$(dirname "$0")/lib/common.sh"
for step in 01_prepare_data 02_pretrain 03_align 04_sft 05_ppo 06_eval; do
  echo "== $step $DATASET"
  bash "$REPO/scripts/$step.sh" "$DATASET"
done
