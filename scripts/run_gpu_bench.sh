#!/usr/bin/env bash
# The GPU measurements of the engine, for a lent GPU machine (see docs/benchmarks.md), in two calls, after
# `bash scripts/gpu_wheels.sh` here (a fresh checkout has no .whl/; carry [".whl", ".inductor_cache"]):
#   bash scripts/run_gpu_bench.sh OUT_DIR            # one request (issue 7's 15x goal), ~9.5 minutes (timeout_s 595)
#   bash scripts/run_gpu_bench.sh OUT_DIR rest [S]   # right after, on the warm machine: S seconds (default 200)
# GPU run 9 (H200) measured one request with int8 weights at 12.4x (inductor's reductions over int8, 1.0-2.4
# TB/s), 14.2x once with the row's columns read in chunks; model.int8_matvec's Triton kernel replaces those
# reductions since, and fused_projections now stacks int8 weights too (4 products a layer, not 7); the
# one-row attention (cuDNN: 0.61 ms a step in run 9) can run model.split_attention's Triton kernels instead
# (attention.FEW_ROWS_KERNEL "split"). The first call checks and times both kernels alone, then measures the
# step with them (fused with the split attention, fused alone, with the row's columns in chunks, separate)
# and with inductor's reductions instead (`compiled_int8_reduction`); both calls pack
# inductor's cache (compiled graphs, Triton kernels and their tuned block sizes) into
# inductor_cache.tgz.part00 (and part01). Joined here into .inductor_cache/inductor_cache.tgz (ignored by git)
# and that folder named in the device tool's `carry`, it is unpacked first, so a later session's
# compilation of the same step skips the tuning.
# Each benchmark writes its JSON after every measurement and bench_gpu starts nothing new after its
# --budget-s, so a cut-off step keeps what it measured. Only 8 files come back from a call: all output goes
# to run.log, and each step writes one JSON file.
# The machine has torch but not necessarily this project's transformers or soundfile: wheels found in .whl/
# (`bash scripts/gpu_wheels.sh` downloads them for its Python) are installed into /tmp/site first.
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
log="$out/run.log"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export TORCHINDUCTOR_CACHE_DIR=/tmp/higgs_inductor
# Inductor's own Triton cache for GPU 0, named for Triton too: model.int8_matvec's kernel and its tuned block
# sizes (cache_results) land beside inductor's kernels and travel back with them.
export TRITON_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR/triton/0
# Each block size Triton's autotuner picks for model.int8_matvec (where it tunes, not reads its cache) in run.log.
export TRITON_PRINT_AUTOTUNING=1
if [ ! -d "$TORCHINDUCTOR_CACHE_DIR" ] && [ -f .inductor_cache/inductor_cache.tgz ]; then
  tar -xzf .inductor_cache/inductor_cache.tgz -C /tmp
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$log"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1 | tee -a "$log"
# Without the wheels every benchmark below fails on its first import: say so once and stop, instead of
# spending the lent minutes on tracebacks. A session's checkout starts without .whl/ (ignored by git).
if ! python3 -c 'from transformers import HiggsAudioV2ForConditionalGeneration' >/dev/null 2>&1; then
  echo "this machine's transformers has no Higgs Audio v2 classes: run 'bash scripts/gpu_wheels.sh' first" \
    "and name .whl in the device tool's carry" | tee -a "$log"
  exit 3
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() { echo "== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log"; }
pack_cache() {
  # Without Triton's intermediate forms (a cached kernel loads from its binary and metadata alone), in parts
  # of 15 MiB (a file that comes back holds at most 16), two at most: the cache travels back beside .whl/
  # (16 MB) and the tree (~7 MB) within the 64 MiB a call carries. Here: cat the parts into
  # .inductor_cache/inductor_cache.tgz.
  rm -f "$out"/inductor_cache.tgz.part*
  tar -czf - -C /tmp --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.llir' --exclude='*.ptx' \
    --exclude='*.source' higgs_inductor 2>>"$log" | split -b 15m -d - "$out/inductor_cache.tgz.part"
  local parts
  parts=$(find "$out" -maxdepth 1 -name 'inductor_cache.tgz.part*' | wc -l)
  echo "inductor cache: $(du -sh /tmp/higgs_inductor 2>/dev/null | cut -f1) on disk, $parts parts packed" | tee -a "$log"
  if [ "$parts" -gt 2 ]; then
    echo "inductor cache: too large to carry, not kept" | tee -a "$log"
    rm -f "$out"/inductor_cache.tgz.part*
  fi
}
watch_cache() {
  # Every 30 s, how far inductor has got: a compilation cut off still shows its pace in run.log.
  while sleep 30; do
    echo "[inductor cache $(date +%T)] $(find "$TORCHINDUCTOR_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l) kernels" \
      "built, $(find "$TORCHINDUCTOR_CACHE_DIR" -name '*.best_config' 2>/dev/null | wc -l) tuned" | tee -a "$log"
  done
}
watch_cache &
trap 'kill %1 2>/dev/null' EXIT
if [ "${2:-}" != rest ]; then
  # The kernel alone on the release's weight shapes: its error against the CPU path's formula and the bytes
  # it reads a second, against cuBLAS's bf16 product of the same row (~30 s, Triton's tuning included).
  step timeout 90 python3 scripts/bench_int8_matvec.py --out "$out/bench_int8_matvec.json"
  # One layer's attention at 1, 8 and 64 rows replayed from CUDA graphs: cuDNN over the span (the default
  # below 128 rows), the split kernels, the memory-efficient kernel's variable-length mode (~20 s).
  step timeout 45 python3 scripts/bench_attention.py --device cuda --graphs --batch-sizes 1,8,64 \
    --out "$out/bench_attention.json"
  # The default step for this run's ratio, and with the split attention; the compiled int8 step with the
  # kernel, fused projections (4 kernels a layer) and the split attention, the same with cuDNN's, with the
  # row's columns in chunks, then with separate projections (7), then with inductor's reductions (run 9's
  # compiled_int8, its kernels in a carried cache): the later ones only where the budget leaves time. Each
  # measured step is profiled once more (its kernels a step: where the 2.67 ms a step 15x allows go).
  # warmup_s is the compilation's time.
  step timeout 420 python3 scripts/bench_gpu.py --out "$out/bench_one_request.json" --budget-s 320 \
    --no-baseline --span-batch 0 --check-rows 0 --profile-measured \
    --modes graphs=1,graphs_split=1,compiled_int8_fused_split=1,compiled_int8_fused=1,compiled_int8_fused_own_columns=1,compiled_int8=1,compiled_int8_reduction=1
  pack_cache
  exit 0
fi
seconds=${3:-200}
# The dataset shape on this card with the defaults (run 8, H100: 401.8x): 1,024 rows of 150-349 frames with
# the slots that fit free memory.
step timeout "$seconds" python3 scripts/bench_gpu.py --out "$out/bench_refill.json" --budget-s 60 --no-baseline \
  --modes "" --refill-rows 1024 --refill-runs auto:1024 --refill-modes graphs --span-batch 0 --check-rows 0
