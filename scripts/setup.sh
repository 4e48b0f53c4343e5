#!/usr/bin/env bash
# Create .venv and install higgs-batch with its test tools. Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
.venv/bin/python -c "import torch, torchaudio, transformers, ray, hydra; print('higgs-batch environment ready:', 'torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
