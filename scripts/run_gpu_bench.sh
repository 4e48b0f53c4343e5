#!/usr/bin/env bash
# The GPU measurements of the engine, for a lent GPU machine (see docs/benchmarks.md), in two calls:
#   bash scripts/run_gpu_bench.sh OUT_DIR        # one request (issue 7's 15x goal) first, ~9.5 minutes (timeout_s 595)
#   bash scripts/run_gpu_bench.sh OUT_DIR rest   # right after, on the warm machine, what time is left
# GPU run 8 met the 300x goal (371.8x, 401.8x reading each row's own columns, now the default from 128 slots)
# but lost the one-request measurement: compiling the step with int8 weights and inductor's coordinate-descent
# tuning outran its 255 s. So the first call now gives that compilation most of its time, and both calls
# pack inductor's cache (compiled graphs, Triton kernels and their tuned block sizes) into
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
if [ ! -d "$TORCHINDUCTOR_CACHE_DIR" ] && [ -f .inductor_cache/inductor_cache.tgz ]; then
  tar -xzf .inductor_cache/inductor_cache.tgz -C /tmp
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$log"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1 | tee -a "$log"
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
  # Whether the default paths' rows get the plain path's codes through the GPU's own kernels (on the CPU the
  # tests assert it): the tiny config in float32 through 4 slots, each row's own columns read alone (the
  # default from 128 slots), and the same over the step's whole span (`bmm`), ~5 s a check.
  step timeout 40 python3 scripts/bench_gpu.py --config tiny --out "$out/bench_exactness.json" --no-baseline \
    --modes "" --span-batch 0 --check-rows 0 --exactness graphs,prefix_once,bmm_prefix_once
  # The 15x goal (runs 7 and 8: graphs 6.67x and 6.64x, compiled untuned 8.85x): the default step for this
  # run's ratio, then the compiled step with int8 decoder weights (model.int8_weights) and inductor's
  # coordinate-descent tuning, which turns one row's matrix products into fused reductions
  # (model.decode_step.compile_options). Compiling took 111 s untuned in run 7; tuned, more than the 245 s
  # run 8 gave it. Its warmup_s is the compilation's time. Where it took under ~3 minutes, the same with the
  # row's columns read in chunks at once (compiled_int8_own_columns), most of its kernels tuned by then.
  step timeout 500 python3 scripts/bench_gpu.py --out "$out/bench_one_request.json" --budget-s 200 \
    --no-baseline --modes graphs=1,compiled_int8=1,compiled_int8_own_columns=1 --span-batch 0 --check-rows 0
  grep -q '"mode": "compiled_int8"' "$out/bench_one_request.json" 2>/dev/null && touch /tmp/higgs_int8_measured
  pack_cache
  exit 0
fi
if [ -f /tmp/higgs_int8_measured ]; then
  # One request compiled in bf16, now tuned (run 7's untuned: 8.85x): most of its kernels are the int8
  # step's, already tuned in the first call's cache.
  step timeout 240 python3 scripts/bench_gpu.py --out "$out/bench_one_request_bf16.json" --budget-s 10 \
    --no-baseline --modes compiled=1 --span-batch 0 --check-rows 0
else
  # The tuned int8 compilation was cut off again: the same step untuned (~2 minutes to compile in run 7's
  # bf16), its int8 projections still one reduction each (model.int8_weights), at inductor's default block
  # sizes.
  step timeout 240 python3 scripts/bench_gpu.py --out "$out/bench_one_request_untuned.json" --budget-s 10 \
    --no-baseline --modes compiled_int8_untuned=1 --span-batch 0 --check-rows 0
fi
pack_cache
# The 300x goal again on the new default: 1,024 rows of 150-349 frames with the slots that fit free memory,
# each row's own columns read alone (run 8: 401.8x) against the step's whole span (`bmm`, run 8: 371.8x).
step timeout 150 python3 scripts/bench_gpu.py --out "$out/bench_refill.json" --budget-s 80 --no-baseline \
  --modes "" --refill-rows 1024 --refill-runs auto:1024 --refill-modes graphs,bmm --span-batch 0 --check-rows 0
# Audiobook chapters: runs 7 and 8 cut this off (~55 s in all).
step timeout 70 python3 scripts/bench_longform.py --config real --device cuda --chapters 24 --slots 24 \
  --chunks 4,10 --steps 60,150 --out "$out/bench_longform.json"
