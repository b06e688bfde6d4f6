#!/usr/bin/env bash
# Creates .venv (if missing) and installs rlhf-rrg with its pinned stack. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build on CPU-only machines.
python -m pip install -q "torch==${RRG_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev]"
python - <<'PY'
import importlib
for name in ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bert_score", "radgraph", "f1chexbert"):
    importlib.import_module(name)
PY
