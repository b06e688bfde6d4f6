#!/usr/bin/env bash
# Step 3: image/report contrastive alignment from the pretrained encoder -> runs/<dataset>/align/export.
#   RRG_HOME=~/rrg ACCEL=multi_gpu.yaml bash scripts/03_align.sh iu_xray
. "$(dirname "$0")/lib/common.sh"
need_data
need_export pretrain 02_pretrain.sh
need_stage_config align
check_inputs
launch_stage align --run.init_from pretrain
