#!/usr/bin/env bash
# Every GPU measurement of the engine in one call, for a lent GPU machine (see docs/benchmarks.md):
#   bash scripts/run_gpu_bench.sh OUT_DIR
# The machine has torch but not necessarily this project's transformers or soundfile: wheels found in .whl/
# (downloaded for its Python with `pip download --no-deps`) are installed into /tmp/site first.
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Vocoding 512 rows of distinct lengths with the release's codec: one call per length vs windows (~20 s).
timeout 120 python3 scripts/bench_vocoding.py --config real --rows 512 --frames-per-call 32768 \
  --out "$out/bench_vocoding.json" 2>&1 | tee "$out/bench_vocoding.log"
# The default path (CUDA graphs of the uncompiled step) first, at 1, 128 and 256 rows (docs/benchmarks.md has
# 8-64 and the whole-prompt prefills from 2026-11-26); the compiled step at 1 and 128 beside it (its warm-up
# on the release model is the unknown, so it must not eat the default path's numbers); a step of 128 rows
# attending to the columns in use vs a whole slot; then 512 mixed-length rows through 128 slots
# (runtime=cluster) in calls of 128 rows, of 512 rows refilled in groups, and with the slots that fit free
# memory (runtime.batch_size=auto) in calls of 512.
timeout 420 python3 scripts/bench_gpu.py --out "$out/bench_gpu.json" --budget-s 330 --modes graphs,compiled \
  --batch-sizes 1,128,256 --plain-batch-sizes 1,128 --refill-rows 512 --refill-slots 128 \
  2>&1 | tee "$out/bench_gpu.log"
