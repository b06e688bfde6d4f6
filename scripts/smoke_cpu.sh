#!/usr/bin/env bash
# The embedded default, end to end on CPU: synthetic chest X-rays -> pretrain -> align -> sft -> ppo -> eval table.
# Tiny models; a few minutes on 2 cores. Everything lands under $RRG_HOME (default: ./rrg_home).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
# Torch threads: the cores the current load leaves idle, at least 1 (oversubscribed threads made generate up to
# 132x slower on a loaded 2-core machine, see benchmarks/machine.py).
idle=$(( $(nproc) - $(cut -d. -f1 /proc/loadavg) ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( idle > 1 ? idle : 1 ))}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RRG_HOME=${RRG_HOME:-$PWD/rrg_home}
DATA=$RRG_HOME/data/synthetic
RUN=$RRG_HOME/runs/demo
DATA_ARGS=(--data.annotation_path "$DATA/annotation.json" --data.image_root "$DATA/images" --run.run_root "$RUN")
LAUNCH=(accelerate launch --config_file accelerate_configs/cpu_debug.yaml)

if [ ! -f "$DATA/annotation.json" ]; then
  python -m rlhf_rrg.data.synthetic --out "$DATA" --n-train 1000 --n-val 100 --n-test 200 --image-size 64 --seed 0
fi
for stage in pretrain align sft ppo; do
  echo "=== stage: $stage"
  "${LAUNCH[@]}" stages/$stage.py --config stages/configs/$stage/debug.yaml "${DATA_ARGS[@]}"
done
echo "=== stage: ppo with --algo scst, from the same SFT export (separate run root)"
"${LAUNCH[@]}" stages/ppo.py --config stages/configs/ppo/debug_scst.yaml "${DATA_ARGS[@]}" \
  --run.run_root "$RRG_HOME/runs/demo_scst" --run.init_from "$RUN/sft/export"
echo "=== evaluation on the test split"
python -m rlhf_rrg.evaluate_run --run-root "$RUN" --split test \
  --data.annotation_path "$DATA/annotation.json" --data.image_root "$DATA/images"
python -m rlhf_rrg.viewer --run-root "$RUN" --out "$RUN/eval/viewer.html"
echo "report viewer: $RUN/eval/viewer.html"
