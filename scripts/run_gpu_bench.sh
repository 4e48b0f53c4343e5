#!/usr/bin/env bash
# Every GPU measurement of the engine in one call, for a lent GPU machine (see docs/benchmarks.md):
#   bash scripts/run_gpu_bench.sh OUT_DIR
# About 9.7 minutes at most (the device tool's per-call limit is 10): run it with timeout_s ~595. bench_gpu
# writes its JSON after every measurement and starts nothing new after its --budget-s, so a cut-off run
# keeps what it measured.
# The machine has torch but not necessarily this project's transformers or soundfile: wheels found in .whl/
# (`bash scripts/gpu_wheels.sh` downloads them for its Python) are installed into /tmp/site first.
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
# First, one layer's decode attention with rows at all stages of their audio, as a refilled batch has them
# (own tokens spread 231-681 after a 357-token prefix): sdpa reading every row up to the longest one
# against FlexAttention reading each row's own blocks (`flex_decode`, since the CPU session of 2026-11-26
# 16:00 UTC; never measured on a GPU; its four compilations, dynamic shapes with and without the prefix's
# log-sum-exp, may take a minute: the largest batch first, each printed as it is measured).
timeout 100 python3 scripts/bench_attention.py --device cuda --batch-sizes 256,64,1 --own-spread 225 \
  --out "$out/bench_attention.json" 2>&1 | tail -60 | tee "$out/bench_attention.log"
# Then where the GPU time of a 256-row decode step and of a 64-row prefill goes (~20 s; run 5 profiled one
# row's step), and prefill groups of 1, 8 and 64 rows with tokens routed by boolean masks (transformers'
# layers) against by index lists (model.token_routing, the default since 2026-11-26 14:10 UTC; ~10 s). Then
# what decides the dataset pipeline's goal: 1,024 rows of 150-349 frames with the slots that fit free
# memory (runtime.batch_size=auto) in one call (the dataset job's 1,024 rows a call), each mode ~60 s with
# its warm-up, as the budget allows: the defaults (slots sized exactly: the rows stop at their own
# lengths); the same with FlexAttention (`flex`); the slots a dataset's rows would get, sized by each
# text's estimate (`dataset_estimate`); the engine before run 6's changes (`previous`, 276x then).
timeout 210 python3 scripts/bench_gpu.py --out "$out/bench_refill.json" --budget-s 180 --no-baseline \
  --modes "" --profile 256 --profile-prefill 64 --prefill-routing 1,8,64 \
  --refill-rows 1024 --refill-runs auto:1024 \
  --refill-modes graphs,flex,dataset_estimate,previous \
  --span-batch 0 --check-rows 0 \
  2>&1 | tee "$out/bench_refill.log"
# Audiobook chapters at the release's size: chunk k of every chapter per engine call (`lockstep`, the order
# before 2026-11-26 18:30 UTC) against each chapter's next chunk joining the running batch (`chained`, the
# order now; `chained_ungathered` without waiting for others to prefill with, `chained_unranked` without
# the chapters with most text left first), 24 chapters of 4-10 chunks of 60-150 steps through 24 slots
# (~55 s; the same shape on the CPU's tiny config: 1,427 / 1,233 / 1,204 / 1,233 decode steps, 1.16x). A decode step costs little more at 32 rows than at 20 (run 5: 5.5 ms at 1 row, 11.8 ms at 128),
# so the steps saved count nearly in full, less the extra prefill forwards' fixed cost.
timeout 80 python3 scripts/bench_longform.py --config real --device cuda --chapters 24 --slots 24 \
  --chunks 4,10 --steps 60,150 --out "$out/bench_longform.json" 2>&1 | tail -70 \
  | tee "$out/bench_longform.log"
# The release's codec: reference clips encoded one at a time, as an evaluation set's rows each bring their
# own voice (never measured on a GPU: it may rival synthesis for such sets), and 64 rows vocoded (~20 s).
timeout 50 python3 scripts/bench_vocoding.py --config real --rows 64 --check-rows 2 --encode-clips 64 \
  --out "$out/bench_codec.json" 2>&1 | tail -40 | tee "$out/bench_codec.log"
# Then one request and the largest batch: the default (CUDA graphs of the uncompiled step) at 1 and 256
# rows, FlexAttention at 256 rows (all rows in step: it reads little less than sdpa there), compiled (its
# warm-up took 78 s on an H100) and with fused q/k/v and gate/up projections (`fused`) at 1 row, in that
# order as the budget allows; the exactness checks on the tiny config last (flex included; transformers'
# generate, 0.62x real time in runs 4 and 5, is not rerun).
timeout 135 python3 scripts/bench_gpu.py --out "$out/bench_gpu.json" --budget-s 105 --no-baseline \
  --modes graphs=1/256,flex=256,compiled=1,fused=1 --span-batch 0 --check-rows 1 \
  2>&1 | tee "$out/bench_gpu.log"
