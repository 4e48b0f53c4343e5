#!/usr/bin/env bash
# Every GPU measurement of the engine in one call, for a lent GPU machine (see docs/benchmarks.md):
#   bash scripts/run_gpu_bench.sh OUT_DIR
# About 9.5 minutes at most (the device tool's per-call limit is 10): run it with timeout_s ~595. bench_gpu
# writes its JSON after every measurement and starts nothing new after 430 s, so a cut-off run keeps what it
# measured.
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
# One layer's decode attention at the release's head shapes: whole prompts in the slots vs a shared prefix
# kept once (generation.engine.shared_prefix_cache), ~10 s.
timeout 60 python3 scripts/bench_attention.py --device cuda --out "$out/bench_attention.json" \
  2>&1 | tee "$out/bench_attention.log"
# Vocoding 512 rows of distinct lengths with the release's codec: one call per length vs windows (~20 s).
timeout 120 python3 scripts/bench_vocoding.py --config real --rows 512 --frames-per-call 32768 \
  --out "$out/bench_vocoding.json" 2>&1 | tee "$out/bench_vocoding.log"
# The default path (CUDA graphs of the uncompiled step) at 1, 128 and 256 rows (docs/benchmarks.md has 8-64
# from 2026-11-26); transformers' RMSNorm instead of the fused one at 1 row; the shared prefix kept once at
# 128 and 256; the compiled step at 1 row (its warm-up on the release model is the unknown, so it comes
# after them); where a step's GPU time goes at 1 and 256 rows (torch.profiler, both cache layouts); then 512
# mixed-length rows through 128 slots (runtime=cluster) in calls of 128 rows, of 512 rows refilled in
# groups, and with the slots that fit free memory (runtime.batch_size=auto) in calls of 512; 256 rows of 8
# voices prefilled voice by voice vs by length alone; 256 audiobook-like rows sharing a narrator before
# their own context turns vs whole prompts; last, a step attending to the columns in use vs a whole slot.
timeout 520 python3 scripts/bench_gpu.py --out "$out/bench_gpu.json" --budget-s 430 \
  --modes graphs=1/128/256,unfused=1,prefix_once=128/256,compiled=1 --profile 1,256 \
  --refill-rows 512 --refill-slots 128 --voices 8 --voice-rows 256 \
  --chunk-rows 256 2>&1 | tee "$out/bench_gpu.log"
