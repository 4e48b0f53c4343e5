#!/usr/bin/env bash
# Create .venv and install higgs-batch with its test tools. Safe to run again: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
# Bytecode on every core: pip compiles the installed files one at a time (~65 s of a ~210 s install on 2
# cores; this ~30 s), and with PYTHONDONTWRITEBYTECODE set imports would not cache it. A file that does not
# compile (some packages ship sources for other Pythons) is skipped, as pip skips it. Only when the installed
# distributions (their names carry their versions) differ from the last compiled ones: checking an unchanged
# tree again costs ~10 s of every later run of this script.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
installed=$(ls "$site" | grep '\.dist-info$' || true)
if [ "$installed" != "$(cat .venv/.compiled-for 2>/dev/null)" ]; then
  .venv/bin/python -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
  printf '%s\n' "$installed" > .venv/.compiled-for
fi
.venv/bin/python -c "import torch, torchaudio, transformers, ray, hydra; print('higgs-batch environment ready:', 'torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
