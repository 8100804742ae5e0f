#!/usr/bin/env bash
# Creates ./.venv and installs dpo-ray with pinned versions. Safe to re-run.
# torch is installed first and pinned: an unpinned torch pulls the CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
# pip's "Location ... is ignored" lines come from this machine's pip config; they are noise.
pipq() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq --upgrade pip
pipq torch==2.13.0
EXTRAS=test
if [ "${1:-}" = "--bench" ]; then EXTRAS=test,bench; fi  # the benchmark's extra: trl, datasets, psutil
pipq -c constraints.txt -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, ray, mlflow, transformers; from importlib.metadata import version; print(f'installed dpo-ray {version(\"dpo-ray\")} in ./.venv (torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}, transformers {transformers.__version__}); next: .venv/bin/dpo-ray run configs/demo.yaml')"
