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
# The default path (CUDA graphs of the uncompiled step) at 1 and 256 rows and with whole prompts in the
# slots at 256 (the shared prefix kept once is the default from 128 rows); the compiled step at 1 and 256
# rows (its 78 s warm-up on an H100 comes after the others); where a step's GPU time goes at 1 and 256 rows
# (torch.profiler, both cache layouts) and a 64-row prefill's (23 % of a 256-row call in GPU run 5, at a
# quarter of the card's bf16 peak); then 1,024 mixed-length rows with the slots that fit free memory
# (runtime.batch_size=auto): the defaults in calls of 512 and of 1,024 (AUTO_CALL_ROWS), and the engine
# before GPU run 6's changes in calls of 512 (276x then); 256 rows of 8 voices prefilled voice by voice vs
# by length alone; 256 audiobook-like rows sharing a narrator before their own context turns vs whole
# prompts; last, a step attending to the columns in use vs a whole slot.
timeout 520 python3 scripts/bench_gpu.py --out "$out/bench_gpu.json" --budget-s 430 \
  --modes graphs=1/256,whole_prompts=256,compiled=1/256 --profile 1,256 --profile-prefill 64 \
  --refill-rows 1024 --refill-runs auto:512,auto:1024 --refill-modes graphs,previous \
  --voices 8 --voice-rows 256 --chunk-rows 256 2>&1 | tee "$out/bench_gpu.log"
