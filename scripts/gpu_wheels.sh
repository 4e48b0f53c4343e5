#!/usr/bin/env bash
# The wheels run_gpu_bench.sh installs on a lent GPU machine, downloaded here into .whl/ (kept out of git;
# name it in the device tool's `carry`). That machine has Python 3.12 with torch 2.11 but transformers 5.17
# (the Higgs v2 classes this project uses came in later) and no soundfile, and nothing can be fetched there.
#   bash scripts/gpu_wheels.sh      # then: run `bash scripts/run_gpu_bench.sh $OUT`, carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --dest .whl \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  "transformers==5.23.*" "soundfile>=0.12,<1" cffi pycparser regex
ls .whl
