#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite on CPU (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The report viewer is tested in a real headless browser; without one that test skips with its reason.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the browser test of the viewer will be skipped"
fi
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The layering of pyproject.toml's import-linter contracts: a part importing a part above it fails the build.
lint-imports --no-cache
# Two workers (CI has 2 cores; most tests use one thread); loadscope keeps a module's tests, and so its module-scoped
# reference runs, on one worker. Arguments after ours win: `bash scripts/test.sh -n 0` runs serially.
python -m pytest -q -n "${RRG_TEST_WORKERS:-2}" --dist loadscope "$@"
