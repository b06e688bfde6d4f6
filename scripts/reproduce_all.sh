#!/usr/bin/env bash
# All steps in order for one dataset; each step checks its own inputs and stops the chain with exit 2.
# Arguments after the dataset go to the four training stages (02..05), e.g. --train.max_steps 2.
#   RRG_HOME=~/rrg RRG_TEXT_PATH=~/models/BiomedVLP-CXR-BERT-general RRG_LLM_PATH=~/models/Qwen2.5-1.5B \
#     ACCEL=zero2.yaml bash scripts/reproduce_all.sh iu_xray
. "$(dirname "$0")/lib/common.sh"
for step in 01_prepare_data 02_pretrain 03_align 04_sft 05_ppo 06_eval; do
  echo "== $step $DATASET"
  case $step in
    01_prepare_data | 06_eval) bash "$REPO/scripts/$step.sh" "$DATASET" ;;
    *) bash "$REPO/scripts/$step.sh" "$DATASET" "${EXTRA[@]}" ;;
  esac
done
