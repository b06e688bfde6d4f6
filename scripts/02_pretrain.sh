#!/usr/bin/env bash
# Step 2: ARM next-cluster pixel pretraining of the Mamba vision encoder -> runs/<dataset>/pretrain/export.
#   RRG_HOME=~/rrg ACCEL=multi_gpu.yaml bash scripts/02_pretrain.sh iu_xray [--train.max_steps 2 ...]
. "$(dirname "$0")/lib/common.sh"
need_data
need_stage_config pretrain
check_inputs
launch_stage pretrain --vision "$RRG_VISION"
