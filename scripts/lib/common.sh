# Shared by the numbered reproduction scripts (sourced, never run): dataset settings, input checks, launch line.
# Every path lives under RRG_HOME: data in $RRG_HOME/data/<dataset>, runs in $RRG_HOME/runs/<dataset>.
# Arguments after the dataset are passed on as overrides (stage keys such as --train.max_steps 2 for 02..05,
# --data.* keys for 01, evaluate_run options for 06); they come last, so they win over the script's own.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SCRIPT=$(basename "$0")
DATASETS="iu_xray mimic_cxr chexpert_plus"
SEED=${RRG_SEED:-42}
ACCEL=${ACCEL:-single_gpu.yaml}
MISSING=()

fail() {
  echo "$SCRIPT: $*" >&2
  exit 2
}

# need PATH WHAT: record PATH as missing (with what produces it); check_inputs reports all of them at once.
need() {
  [ -e "$1" ] || MISSING+=("$1 ($2)")
}

check_inputs() {
  if [ "${#MISSING[@]}" -gt 0 ]; then
    echo "$SCRIPT: missing inputs, nothing was started:" >&2
    printf '  - %s\n' "${MISSING[@]}" >&2
    exit 2
  fi
}

[ -n "${RRG_HOME:-}" ] || fail "RRG_HOME is not set: export RRG_HOME=/path/with/data/and/runs"
DATASET=${1:-}
case " $DATASETS " in
  *" $DATASET "*) ;;
  *) fail "usage: $SCRIPT <dataset>, one of: $DATASETS (got '${DATASET}')" ;;
esac
EXTRA=("${@:2}")
. "$REPO/scripts/datasets/$DATASET.env"

ANNOTATION=$RRG_HOME/$RRG_ANNOTATION
IMAGE_ROOT=$RRG_HOME/$RRG_IMAGE_ROOT
RUN_ROOT=$RRG_HOME/runs/$DATASET
DATA_ARGS=(--data.annotation_path "$ANNOTATION" --data.image_root "$IMAGE_ROOT" "${RRG_DATA_ARGS[@]}")
cd "$REPO"

need_data() {
  need "$ANNOTATION" "download: $RRG_SOURCE"
  need "$IMAGE_ROOT" "download: $RRG_SOURCE"
}

need_export() {
  need "$RUN_ROOT/$1/export/export_complete.json" "run scripts/$2 $DATASET first"
}

need_stage_config() {
  need "stages/configs/$1/$DATASET.yaml" "the stage config for $DATASET"
  need "accelerate_configs/$ACCEL" "set ACCEL to a file in accelerate_configs/"
}

# launch_stage STAGE [overrides...]: one stage under accelerate with the dataset's data and seed settings, then
# the script's overrides, then the user's extra arguments.
launch_stage() {
  local stage=$1
  shift
  accelerate launch --quiet --config_file "accelerate_configs/$ACCEL" "stages/$stage.py" \
    --config "stages/configs/$stage/$DATASET.yaml" --run.run_root "$RUN_ROOT" --run.seed "$SEED" \
    "${DATA_ARGS[@]}" "$@" "${EXTRA[@]}"
}
