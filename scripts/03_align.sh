#!/usr/bin/env bash
# Step 3: image/report contrastive alignment from the pretrained encoder -> runs/<dataset>/align/export.
# RRG_TEXT_PATH is the local folder of the report encoder (a BERT-family checkpoint, e.g. BiomedVLP-CXR-BERT-general).
#   RRG_HOME=~/rrg RRG_TEXT_PATH=~/models/BiomedVLP-CXR-BERT-general ACCEL=multi_gpu.yaml bash scripts/03_align.sh iu_xray
. "$(dirname "$0")/lib/common.sh"
[ -n "${RRG_TEXT_PATH:-}" ] || fail "RRG_TEXT_PATH is not set: the local folder of the report encoder (BERT family)"
need_data
need_export pretrain 02_pretrain.sh
need "$RRG_TEXT_PATH/config.json" "the report encoder folder (RRG_TEXT_PATH)"
need_stage_config align
check_inputs
launch_stage align --run.init_from pretrain --text.path "$RRG_TEXT_PATH"
