#!/usr/bin/env bash
# The embedded default, end to end on CPU: synthetic chest X-rays -> pretrain -> align -> sft -> RL -> eval table and
# the probe ceiling.
# Tiny models; about 20 minutes on 2 cores. Everything lands under $RRG_HOME (default: ./rrg_home).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
# One torch thread unless told otherwise: the tiny models gain little from more, oversubscribed threads made generate
# up to 132x slower on a loaded 2-core machine (benchmarks/machine.py), and a fixed count keeps reruns identical.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RRG_HOME=${RRG_HOME:-$PWD/rrg_home}
DATA=$RRG_HOME/data/synthetic
RUN=$RRG_HOME/runs/demo
DATA_ARGS=(--data.annotation_path "$DATA/annotation.json" --data.image_root "$DATA/images" --run.run_root "$RUN")
LAUNCH=(accelerate launch --quiet --config_file accelerate_configs/cpu_debug.yaml)

if [ ! -f "$DATA/annotation.json" ]; then
  python -m rlhf_rrg.data.synthetic --out "$DATA" --n-train 1000 --n-val 100 --n-test 200 --image-size 64 --seed 0
fi
for stage in pretrain align sft ppo; do
  echo "=== stage: $stage"
  "${LAUNCH[@]}" stages/$stage.py --config stages/configs/$stage/debug.yaml "${DATA_ARGS[@]}"
done
echo "=== evaluation on the test split"
python -m rlhf_rrg.evaluate_run --run-root "$RUN" --split test \
  --data.annotation_path "$DATA/annotation.json" --data.image_root "$DATA/images"
echo "=== what the SFT export sees vs what it writes (linear probe on its frozen features: the ceiling RL aims at)"
python -m rlhf_rrg.probe --run-root "$RUN" --stage sft --split test
python -m rlhf_rrg.viewer --run-root "$RUN" --out "$RUN/eval/viewer.html"
echo "report viewer: $RUN/eval/viewer.html"
