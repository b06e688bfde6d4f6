#!/usr/bin/env bash
# Step 1: check that the dataset is in place under $RRG_HOME/data and readable; print the split sizes.
# CheXpert Plus: val is the CSV's valid split, test a patient-level 10% of its train split (rlhf_rrg.data.annotation).
#   RRG_HOME=~/rrg bash scripts/01_prepare_data.sh iu_xray [--data.on_error skip]
. "$(dirname "$0")/lib/common.sh"
need_data
check_inputs
python - "${DATA_ARGS[@]}" "${EXTRA[@]}" <<'PY'
import sys

from rlhf_rrg.config import load_config
from rlhf_rrg.data.dataset import DataConfig, read_studies
from rlhf_rrg.evaluate_run import EvalDataConfig

data = load_config(EvalDataConfig, None, sys.argv[1:]).data
for split in ("train", "val", "test"):
    studies = read_studies(data, split)
    print(f"{data.dataset} {split}: {len(studies)} studies, skipped {studies.skipped or 'none'}")
PY
