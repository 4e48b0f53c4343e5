"""Engine throughput on the release-size model against plain transformers `generate`, as JSON.

    python scripts/bench_gpu.py --out bench_gpu.json             # GPU: HiggsAudioV2Config defaults, random bf16
    python scripts/bench_gpu.py --config tiny --frames 40        # CPU smoke run with the tiny config
    bash scripts/run_gpu_bench.sh $OUT                           # the whole GPU session's measurements

Each row is a realistic prompt: ~300 text tokens of script plus a 10 s reference (250 frames of codes, given
as a user/assistant turn exactly as a cloned voice is). Every row generates --frames frames, EOS ignored.
Reports frames/s, x real time (25 frames = 1 s) and peak GPU memory per batch size for the decode modes
(`compiled`: the slot cache's step torch.compiled, then replayed from CUDA graphs; `graphs`: the default,
the same uncompiled; `unshared`: `graphs` with every row prefilling its whole prompt, though all rows share
one reference turn; `whole_prompts`: `graphs` with that shared turn in every slot, not kept once beside them;
`previous`: the defaults before GPU run 6 (whole prompts, one codec call per length, a batch's first rows
prefilled in one forward, rows admitted by prompt length); `prompt_order`: `graphs` admitting rows by prompt
length alone, not the longest first; `refill_at_share`: `graphs` refilling only once 1/8 of the slots is
free, no rows prefilled ahead; `dataset_2048` / `dataset_estimate`: in the mixed-length runs, `graphs`
with slots sized as a dataset's rows would be (DATASET_RESERVE); `unfused`: `graphs` with transformers' RMSNorm instead of the fused kernel;
`fused` / `compiled_fused`: `graphs` / `compiled` with fused q/k/v and gate/up projections;
`compiled_int8` / `compiled_int8_untuned`: `compiled` at one row with int8 decoder weights, with and without
coordinate-descent tuning (each product model.int8_matvec's Triton kernel); `compiled_int8_reduction`: the
products as inductor's own reductions instead; `compiled_int8_own_columns`: `compiled_int8` reading the row's
columns in chunks at once; `compiled_int8_fused` / `compiled_int8_fused_own_columns`: `compiled_int8` /
`compiled_int8_own_columns` with fused q/k/v and gate/up projections (four int8 products a layer, not seven);
`graphs_split` / `compiled_int8_fused_split`: `graphs` / `compiled_int8_fused` with few rows' attention
through model.split_attention's Triton kernels (model.attention.FEW_ROWS_KERNEL);
`split_efficient`
/ `split_cudnn`: `graphs` with the rows' own columns beside a shared prefix read by sdpa's fused kernels
(model.attention.OWN_KERNEL; the prefix is kept once from 128 rows); `bmm`: `graphs` with every row reading
the step's whole span of its own columns, not only those in use (the default before GPU run 8; `graphs` reads
each row's own from 128 slots, model.attention.MIN_OWN_COLUMNS_SLOTS); `vocode_after`: `graphs` vocoding a
call's rows after they all decode, not in groups beside the decoding (overlap_vocoding); `prefill_beside`:
`graphs` prefilling refills while the running rows decode (overlap_prefill); `static`: the
slot cache run eagerly; `dynamic`: the plain path, transformers' DynamicCache and RMSNorm run eagerly after
a whole-prompt prefill per row; `--modes graphs=1/128,compiled=1` gives each mode its own batch sizes), transformers'
`model.generate` at batch 1 on the same prompt in the same run as the baseline, and whether the fast path
gives the plain path's codes (exactly on the tiny config in float32; how far greedy rows agree on the
release config in bf16). No download: weights are random, which changes no timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model.admission as admission  # noqa: E402
import model.attention as attention  # noqa: E402
import model.decode_step as decode_step  # noqa: E402
import model.engine as engine_module  # noqa: E402
import model.int8_weights as int8_weights  # noqa: E402
from model.checkpoint import resolve_device  # noqa: E402
from model.engine import EngineOptions, SynthesisEngine  # noqa: E402
from model.fused_projections import use_fused_projections  # noqa: E402
from model.requests import ContextTurn, SynthesisRequest  # noqa: E402
from model.rms_norm import use_fused_rms_norms  # noqa: E402
from model.tiny import random_checkpoint  # noqa: E402
from scripts.bench_report import header  # noqa: E402

FRAME_RATE = 25
WORDS = [
    "the",
    "narrator",
    "speaks",
    "clearly",
    "about",
    "rivers",
    "mountains",
    "cities",
    "and",
    "the",
    "people",
    "who",
    "travel",
    "between",
    "them",
    "while",
    "the",
    "evening",
    "light",
    "fades",
    "slowly",
    "over",
    "quiet",
    "streets",
    "and",
    "distant",
    "harbours",
    "full",
    "of",
    "boats",
]


# How the engine decodes: a fixed-shape slot cache replayed from CUDA graphs (the default), the same cache
# run eagerly, and transformers' DynamicCache run eagerly (the plain path).
# The compiled step at one row with int8 decoder weights: the options of the compiled_int8 modes, which
# differ in MODE_CONSTANTS and fused_projections alone.
COMPILED_INT8 = {
    "static_cache": True,
    "cuda_graphs": True,
    "compile": True,
    "int8_weights": True,
    "max_batch_size": 1,
}
MODES = {
    "compiled": {"static_cache": True, "cuda_graphs": True, "compile": True},
    "graphs": {"static_cache": True, "cuda_graphs": True},
    "static": {"static_cache": True, "cuda_graphs": False},
    # Also transformers' own RMSNorm: the plain path, and the engine behind the transformers baseline.
    "dynamic": {"static_cache": False, "cuda_graphs": False, "share_prefix": False, "fused_norms": False},
    # The default with transformers' eight-kernel RMSNorm instead of the fused one.
    "unfused": {"static_cache": True, "cuda_graphs": True, "fused_norms": False},
    # The default with q/k/v and gate/up projections as one matrix product each (fused_projections), and
    # the same compiled.
    "fused": {"static_cache": True, "cuda_graphs": True, "fused_projections": True},
    "compiled_fused": {"static_cache": True, "cuda_graphs": True, "compile": True, "fused_projections": True},
    # The compiled step with int8 decoder weights (model.int8_weights), for one request at a time only.
    "compiled_int8": COMPILED_INT8,
    # The same compiled without coordinate-descent tuning (model.decode_step.TUNE_ONE_SLOT, set by
    # MODE_CONSTANTS): a shorter compilation, the int8 projections' reductions at inductor's default block
    # sizes.
    "compiled_int8_untuned": COMPILED_INT8,
    # `compiled_int8` with the row's columns read in chunks at once (own_columns_attention at one slot,
    # model.attention.MIN_OWN_COLUMNS_SLOTS, set by MODE_CONSTANTS): uncompiled, the chunks' join cost more
    # than the 8 CTAs of one row's attention (run 8: 5.54x against 6.69x); compiled, it fuses.
    "compiled_int8_own_columns": COMPILED_INT8,
    # `compiled_int8` with each one-row product the multiply-and-sum reduction inductor compiles, not
    # model.int8_matvec's Triton kernel (model.int8_weights.TRITON_MATVEC, set by MODE_CONSTANTS): GPU run
    # 9's `compiled_int8`.
    "compiled_int8_reduction": COMPILED_INT8,
    # `compiled_int8` and `compiled_int8_own_columns` with a layer's q/k/v and gate/up int8 products as one
    # each (fused_projections): 4 of model.int8_matvec's kernels a layer instead of 7.
    "compiled_int8_fused": {**COMPILED_INT8, "fused_projections": True},
    "compiled_int8_fused_own_columns": {**COMPILED_INT8, "fused_projections": True},
    # `graphs` and `compiled_int8_fused` with few rows' attention through model.split_attention's Triton
    # kernels, each row's own columns cut into splits for every SM (model.attention.FEW_ROWS_KERNEL "split",
    # set by MODE_CONSTANTS), not cuDNN's kernel over the step's span.
    "graphs_split": {"static_cache": True, "cuda_graphs": True},
    "compiled_int8_fused_split": {**COMPILED_INT8, "fused_projections": True},
    # The default with the rows' own columns read by sdpa's fused kernels beside the shared prefix
    # (model.attention.OWN_KERNEL, set by MODE_CONSTANTS).
    "split_efficient": {"static_cache": True, "cuda_graphs": True},
    "split_cudnn": {"static_cache": True, "cuda_graphs": True},
    # The default with every row reading the step's whole span of its own columns, not only those in use
    # (model.attention.OWN_KERNEL "bmm", set by MODE_CONSTANTS).
    "bmm": {"static_cache": True, "cuda_graphs": True},
    # The default vocoding a call's rows after they all decode (the default before 2026-11-27 06:00 UTC), not
    # in groups beside the decoding (overlap_vocoding).
    "vocode_after": {"static_cache": True, "cuda_graphs": True, "overlap_vocoding": False},
    # The default prefilling refills while the running rows decode (overlap_prefill).
    "prefill_beside": {"static_cache": True, "cuda_graphs": True, "overlap_prefill": True},
    # The default slot cache + graphs with every row prefilling its whole prompt (no shared reference turn).
    "unshared": {"static_cache": True, "cuda_graphs": True, "share_prefix": False},
    # The default with the rows' shared reference turn in every slot (no shared_prefix_cache).
    "whole_prompts": {"static_cache": True, "cuda_graphs": True, "shared_prefix_cache": False},
    # The default before the H100 run of 2026-11-26: whole prompts in the slots, one codec call per row
    # length, a call's first batch prefilled in one forward.
    "previous": {
        "static_cache": True,
        "cuda_graphs": True,
        "shared_prefix_cache": False,
        "vocode_windows": False,
        "max_prefill_rows": 1 << 30,
        "overlap_vocoding": False,
    },
    # The default admitting a call's rows by prompt length alone, not the longest expected first.
    "prompt_order": {"static_cache": True, "cuda_graphs": True},
    # The default refilling once REFILL_SHARE of the slots is free, none prefilled ahead (PREFILL_AHEAD).
    "refill_at_share": {"static_cache": True, "cuda_graphs": True},
    # The default with the mixed rows' slots sized as a dataset's would be (DATASET_RESERVE).
    "dataset_2048": {"static_cache": True, "cuda_graphs": True},
    "dataset_estimate": {"static_cache": True, "cuda_graphs": True},
}
# A dataset's rows end on stream-eos under generation.max_new_tokens (2,048), so their slots are sized for
# that, or by each text's estimated speech length (generation.engine.reserve=estimate). The bench's rows stop
# at their own lengths (stream-eos ignored), which sizes their slots exactly; these modes size them as a
# dataset's instead, the estimate stood in for by DATASET_MARGIN x each row's length (the example voices'
# transcripts are estimated at 1.5-2.9x what their recordings take: tests/test_speech_length.py).
DATASET_MAX_NEW_TOKENS = 2048
DATASET_MARGIN = 2.0
DATASET_RESERVE = {"dataset_2048": "max_new_tokens", "dataset_estimate": "estimate"}
# model.engine constants (model.admission's, model.attention's and model.decode_step's as `admission.NAME`,
# `attention.NAME`, `decode_step.NAME`)
# a mode sets while it runs (the admission order came after `previous`).
MODE_CONSTANTS = {
    "previous": {"admission.LENGTH_CLASS": 1 << 30, "admission.PREFILL_AHEAD": False},
    "prompt_order": {"admission.LENGTH_CLASS": 1 << 30},
    "refill_at_share": {"admission.PREFILL_AHEAD": False},
    "split_efficient": {"attention.OWN_KERNEL": "efficient"},
    "split_cudnn": {"attention.OWN_KERNEL": "cudnn"},
    "bmm": {"attention.OWN_KERNEL": "bmm"},
    "compiled_int8_untuned": {"decode_step.TUNE_ONE_SLOT": False},
    "compiled_int8_own_columns": {"attention.MIN_OWN_COLUMNS_SLOTS": 1},
    "compiled_int8_fused_own_columns": {"attention.MIN_OWN_COLUMNS_SLOTS": 1},
    "compiled_int8_reduction": {"int8_weights.TRITON_MATVEC": False},
    "graphs_split": {"attention.FEW_ROWS_KERNEL": "split"},
    "compiled_int8_fused_split": {"attention.FEW_ROWS_KERNEL": "split"},
}
CONSTANT_MODULES = {
    "": engine_module,
    "admission": admission,
    "attention": attention,
    "decode_step": decode_step,
    "int8_weights": int8_weights,
}


def engine_for(loaded, mode: str) -> SynthesisEngine:
    return SynthesisEngine(loaded, EngineOptions(ignore_eos=True, refill=True, **MODES[mode]))


def script(i: int, tokens: int, tokenizer) -> str:
    words, text = [], ""
    k = i
    while len(tokenizer(text).input_ids) < tokens:
        words.extend(WORDS[k % len(WORDS)] for _ in range(8))
        k += 7
        text = " ".join(words) + "."
    return text


def requests(n: int, frames: int, text_tokens: int, ref_frames: int, tokenizer) -> list[SynthesisRequest]:
    rng = np.random.default_rng(0)
    ref = ContextTurn(text=script(99, 40, tokenizer), codes=rng.integers(0, 1024, size=(8, ref_frames)))
    # The delay pattern takes 8 steps before the first frame (EOS ignored, no closing staircase).
    return [
        SynthesisRequest(
            id=f"r{i}",
            text=script(i, text_tokens, tokenizer),
            context=[ref],
            seed=i,
            max_new_tokens=frames + 8,
        )
        for i in range(n)
    ]


WARM_AUTO_ROWS = 512


def measure(
    engine: SynthesisEngine,
    batch: int,
    frames: int,
    rows: list[SynthesisRequest],
    count: int = 0,
    per_call: int = 0,
    profile: bool = False,
) -> dict:
    """`count` rows (default `batch`) through `batch` slots (0: as many as fit free memory, the engine's
    choice), `per_call` rows per engine.generate call (default all of them in one), as a dataset job's actor
    gets them. With `profile`, one more call runs under torch.profiler after the timed ones: the kernels its
    CUDA graphs replay (a compiled step's fused ones too), per decode step."""
    engine.options.max_batch_size = batch
    count = count or batch
    per_call = per_call or count
    # Warm-up: kernels, allocator and, for the static cache, the CUDA graphs of the buckets and spans this run
    # visits (two batches' worth of rows pass through most of them; a later one is captured when first met).
    # With slots chosen from free memory, up to WARM_AUTO_ROWS of a call's rows: the mixed rows' lengths
    # repeat every 200, so those already give the call's slots, and a warm-up of a whole 1,024-row call
    # would cost as much as the measurement.
    warm = time.perf_counter()
    traced = dynamo_traces()
    warm_rows = min(count, 2 * batch) if batch else min(per_call, WARM_AUTO_ROWS)
    engine.generate(rows[:warm_rows] if engine.options.static_cache else rows[: min(count, 2)])
    warmup_s = time.perf_counter() - warm
    traced_warm = dynamo_traces()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prefills = watch_prefills(engine)
    calls = [rows[i : min(count, i + per_call)] for i in range(0, count, per_call)]
    with counting_steps() as steps:
        started = time.perf_counter()
        results = [r for call in calls for r in engine.generate(call)]
        wall = time.perf_counter() - started
    del engine._prefill  # the instance attribute watch_prefills set; the method shows through again
    generated = sum(r.generated_frames for r in results)
    out = {
        "batch_size": batch,
        "frames_per_row": frames,
        "prompt_tokens": results[0].prompt_tokens,
        "wall_s": round(wall, 3),
        "frames_per_s": round(generated / wall, 1),
        "x_real_time": round(generated / FRAME_RATE / wall, 2),
        "prefill_s": round(max(r.timings["prefill_s"] for r in results), 3),
        # Every prefill forward of the timed calls, refills included: how many, and their time together.
        "prefill_calls": len(prefills),
        "prefill_total_s": round(sum(prefills), 3),
        "vocode_s": round(sum(r.timings["vocode_s"] for r in results), 3),
        "warmup_s": round(warmup_s, 1),  # compilation and graph capture included
    }
    # Decoding alone, when all rows decode side by side (no refill): the longest row's decode time is the batch's.
    decode_s = max(r.timings["decode_s"] for r in results)
    out["decode_frames_per_s"] = round(generated / decode_s, 1) if decode_s > 0 and count <= batch else None
    if engine.device.type == "cuda":
        out["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    out["decode_steps"] = len(steps)
    # From the last call's last decode step to its results: that step, then the vocoding left after it
    # (all of the call's with overlap_vocoding off).
    out["after_last_step_s"] = round(started + wall - steps[-1], 3) if steps else None
    if engine._decode_step is not None:
        slots = engine._decode_step.cache.slots
        if engine.options.ignore_eos:  # each row takes exactly its max_new_tokens steps
            # The fewest steps the calls could take: every slot busy until each call's last rows finish.
            out["fewest_steps"] = sum(
                math.ceil(sum(r.max_new_tokens for r in call) / slots) for call in calls
            )
        out["kv_slots"] = slots
        out["kv_slot_tokens"] = engine._decode_step.cache.length
        out["cuda_graph_buckets"] = engine._decode_step.captured
        step = engine._decode_step
        out["own_kernel"] = attention.OWN_KERNEL if step.cache.prefix_capacity or step.own_columns else None
        if step.own_columns and slots < attention.MIN_OWN_COLUMNS_SLOTS:
            out["own_kernel"] = "split"  # model.split_attention (FEW_ROWS_KERNEL)
        if engine.options.compile:  # a step that failed to compile ran uncompiled: not what the mode measures
            out["compiled"] = step.compiled and not step.compile_failed
            # Graphs dynamo traced (each an inductor compilation) in the warm-up and in the timed calls: one
            # in the timed calls is a compilation inside the measurement.
            out["dynamo_traces"] = {"warmup": traced_warm - traced, "timed": dynamo_traces() - traced_warm}
    if profile and steps:
        # Prefill and vocoding kernels included, spread over the call's steps: at one row they are ~2 %.
        out["profile"] = profiled(engine.device, lambda: engine.generate(calls[0]), len(steps) // len(calls))
    return out


def dynamo_traces() -> int:
    """Graphs dynamo has traced in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@contextmanager
def counting_steps() -> Iterator[list[float]]:
    """The decode steps any engine runs inside the block (DecodeStep calls): when each was launched."""
    steps: list[float] = []
    original = decode_step.DecodeStep.__call__

    def counted(self, *args):
        steps.append(time.perf_counter())
        return original(self, *args)

    decode_step.DecodeStep.__call__ = counted
    try:
        yield steps
    finally:
        decode_step.DecodeStep.__call__ = original


def watch_prefills(engine: SynthesisEngine) -> list[float]:
    """The seconds of each prefill forward `engine` runs from now on (an instance attribute over the method)."""
    seconds: list[float] = []
    prefill = engine._prefill

    def timed(*args):
        started = time.perf_counter()
        state = prefill(*args)
        seconds.append(time.perf_counter() - started)
        return state

    engine._prefill = timed
    return seconds


def measure_voice_library(
    engine: SynthesisEngine, batch: int, voices: int, rows: list[SynthesisRequest], count: int
) -> dict:
    """`count` rows cycling through `voices` reference turns (a voice library) through `batch` slots, with
    each voice's rows prefilled as a run that shares its tokens (MIN_VOICE_RUN) against rows grouped by
    prompt length alone, mixing voices (the engine before voice runs)."""
    rng = np.random.default_rng(1)
    turns = [
        replace(rows[0].context[0], codes=rng.integers(0, 1024, size=rows[0].context[0].codes.shape))
        for _ in range(voices)
    ]
    library = [
        replace(rows[i % len(rows)], id=f"v{i}", seed=2000 + i, context=[turns[i % voices]])
        for i in range(count)
    ]
    return {
        "voices": voices,
        **before_and_after(
            engine, batch, library, "admission.MIN_VOICE_RUN", 1 << 30, ("by_length", "voice_runs")
        ),
    }


def measure_chunks(engine: SynthesisEngine, batch: int, rows: list[SynthesisRequest], count: int) -> dict:
    """`count` audiobook-like rows through `batch` slots: one narrator's reference turn, then each row's own
    earlier chunk as a context turn (100 frames), prefilled sharing the narrator's tokens against whole
    prompts (MIN_SHARED_PREFIX out of reach: the engine before a shared prefix could precede a row's own
    audio)."""
    rng = np.random.default_rng(2)
    narrator = rows[0].context[0]
    chunks = [
        replace(
            rows[i % len(rows)],
            id=f"c{i}",
            seed=3000 + i,
            context=[
                narrator,
                ContextTurn(text=rows[(i + 1) % len(rows)].text, codes=rng.integers(0, 1024, (8, 100))),
            ],
        )
        for i in range(count)
    ]
    names = ("whole_prompts", "narrator_shared")
    return before_and_after(engine, batch, chunks, "MIN_SHARED_PREFIX", 1 << 30, names)


@contextmanager
def dataset_reserve(engine: SynthesisEngine, mode: str) -> Iterator[None]:
    """Rows' slots sized as a dataset's would be under `mode` (DATASET_RESERVE), for the block; the rows still
    stop at their max_new_tokens, their own lengths."""
    policy = DATASET_RESERVE.get(mode)
    if policy is None:
        yield
        return
    codebooks = engine.num_codebooks

    def reserve(request: SynthesisRequest) -> int:
        if policy == "max_new_tokens":
            return DATASET_MAX_NEW_TOKENS
        frames = request.max_new_tokens - engine_module.audio_steps(0, codebooks)
        estimated = engine_module.audio_steps(int(DATASET_MARGIN * frames), codebooks)
        return engine_module.slot_reserve(estimated, DATASET_MAX_NEW_TOKENS)

    engine._reserve = reserve
    try:
        yield
    finally:
        del engine._reserve  # the instance attribute; the method shows through again


def mode_constants(mode: str):
    """The engine's constants as `mode` sets them (MODE_CONSTANTS), for the block."""
    return engine_constants(MODE_CONSTANTS.get(mode, {}))


@contextmanager
def engine_constants(constants: dict) -> Iterator[None]:
    """The engine's constants at the values `constants` names (see engine_constant), for the block, then back
    at their own."""
    with ExitStack() as stack:
        for name, value in constants.items():
            stack.enter_context(engine_constant(name, value))
        yield


@contextmanager
def engine_constant(name: str, value) -> Iterator[None]:
    """model.engine's constant `name` (model.admission's, model.attention's or model.decode_step's, as
    `admission.NAME`, `attention.NAME` or `decode_step.NAME`) at `value` for the block, then back at its own."""
    module, name = constant_place(name)
    own = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, own)


def constant_place(name: str) -> tuple:
    """The module and the bare name of an engine constant named as engine_constant takes it."""
    module, _, name = name.rpartition(".")
    return CONSTANT_MODULES[module], name


def before_and_after(
    engine: SynthesisEngine,
    batch: int,
    rows: list[SynthesisRequest],
    constant: str,
    undone,
    names: tuple[str, str],
) -> dict:
    """`rows` through `batch` slots twice: with model.engine's `constant` at `undone` (the change off), then
    at its value; with the prefill and wall-time ratios of the two."""
    out: dict = {"rows": len(rows)}
    for name, setting in zip(names, (undone, getattr(*constant_place(constant))), strict=True):
        with engine_constant(constant, setting):
            out[name] = measure(engine, batch, 0, rows, count=len(rows))
    before, after = (out[name] for name in names)
    out["prefill_ratio"] = round(before["prefill_total_s"] / after["prefill_total_s"], 2)
    out["wall_ratio"] = round(before["wall_s"] / after["wall_s"], 2)
    return out


def measure_refill(
    engine: SynthesisEngine,
    batch: int,
    n: int,
    rows: list[SynthesisRequest],
    per_call: int,
    share: float = admission.REFILL_SHARE,
    mode: str = "",
) -> dict:
    """`n` rows of 150-349 frames through `batch` slots, `per_call` rows per call: rows finish at different
    steps and waiting rows of the same call take their slots (continuous batching), as in a dataset job's
    actor; each call ends draining to its longest row. `share`: the engine's REFILL_SHARE (0: a slot is
    refilled as soon as its row finishes, one prefill per look); `mode`'s MODE_CONSTANTS hold meanwhile, and
    its DATASET_RESERVE sizes the rows' slots."""
    mixed = [
        replace(rows[i % len(rows)], id=f"m{i}", seed=1000 + i, max_new_tokens=150 + (i * 37) % 200 + 8)
        for i in range(n)
    ]
    with (
        engine_constant("admission.REFILL_SHARE", share),
        mode_constants(mode),
        dataset_reserve(engine, mode),
    ):
        result = measure(engine, batch, 0, mixed, count=n, per_call=per_call)
    result.update(rows=n, rows_per_call=per_call, refill_share=share, frames_per_row="150-349")
    return result


def baseline_generate(engine: SynthesisEngine, frames: int, request: SynthesisRequest) -> dict:
    """transformers' own HiggsAudioV2 generate at batch 1 on the same prompt."""
    input_ids, audio = engine.prepare(request)
    device = engine.device
    model = engine.model
    use_fused_rms_norms(model, fused=False)  # transformers as it comes
    use_fused_projections(model, fused=False)
    kwargs = {
        "input_ids": torch.tensor([input_ids], device=device),
        "attention_mask": torch.ones((1, len(input_ids)), dtype=torch.long, device=device),
        "audio_input_ids": audio[None].to(device),
        "audio_input_ids_mask": torch.ones((1, len(audio)), dtype=torch.bool, device=device),
        "max_new_tokens": frames + 8,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 0.95,
    }
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # run to max_new_tokens, like the engine rows
    try:
        with torch.inference_mode():
            model.generate(**{**kwargs, "max_new_tokens": 10})
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            out = model.generate(**kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
    finally:
        model.generation_config.eos_token_id = saved_eos
    steps = out.shape[1] - len(audio) if out.dim() == 3 else frames + 8
    generated = steps - 8  # like the engine, count audio frames: not the opening bos frame, staircases, eos
    result = {
        "batch_size": 1,
        "steps": int(steps),
        "wall_s": round(wall, 3),
        "frames_per_s": round(generated / wall, 1),
        "x_real_time": round(generated / FRAME_RATE / wall, 2),
    }
    if device.type == "cuda":
        result["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return result


def slotted(engine: SynthesisEngine, requests: list[SynthesisRequest]):
    """`requests` prepared, the call's shared prefix (kept once when the engine does that, else None) and
    the engine's decode step with a slot for each: (prepared, prefix, DecodeStep)."""
    prepared = [engine._prepare(i, r) for i, r in enumerate(requests)]
    prefix = engine._call_prefix(prepared, len(prepared))
    return prepared, prefix, engine._slots(len(prepared), prepared, prefix)


def prefilled(engine: SynthesisEngine, requests: list[SynthesisRequest]):
    """The engine's decode step with `requests` prefilled into its slots, ready to step: (DecodeStep,
    SlotBatch)."""
    from model.slot_batch import SlotBatch

    prepared, prefix, step = slotted(engine, requests)
    state = SlotBatch(step)
    # In forwards of max_prefill_rows at most, as the engine prefills: 256 rows in one ran out of an H100's
    # memory (GPU run 8).
    group = engine.options.max_prefill_rows
    for start in range(0, len(prepared), group):
        state.merge(engine._prefill(prepared[start : start + group], prefix))
    return step, state


def step_time_by_span(
    engine: SynthesisEngine, batch: int, rows: list[SynthesisRequest], steps: int = 48
) -> dict:
    """Milliseconds per decode step of `batch` rows in slots reserved for max_new_tokens=2048 (or what the
    model's context leaves: 1,360 frames after a 688-token prompt in HiggsAudioV2Config's 2,048), attending
    to the columns in use (the prompt plus a few hundred frames, rounded up) against the whole slot, which
    is what every step read before spans. Rows stopping on stream-eos long before max_new_tokens are the
    common case that the fixed-length rows of the other measurements do not show."""
    from model.slot_cache import round_up

    engine.options.max_batch_size = batch
    prompt = max(len(engine._prepare(i, r).input_ids) for i, r in enumerate(rows[:batch]))
    frames = min(2048, engine.max_context - prompt)
    step, state = prefilled(engine, [replace(r, max_new_tokens=frames) for r in rows[:batch]])
    widest, any_ras = state.sampling_shape

    def step_ms(span: int) -> float:
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step(batch, span, widest, any_ras)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return round((time.perf_counter() - started) / steps * 1e3, 3)

    in_use = round_up(state.length + 256)  # after ~10 s of audio
    out = {"batch_size": batch, "slot_columns": step.cache.length}
    for name, span in (("span", in_use), ("whole_slot", step.cache.length)):
        step_ms(span)  # captures the graph
        out[name] = {"columns": span, "step_ms": step_ms(span)}
    out["ratio"] = round(out["whole_slot"]["step_ms"] / out["span"]["step_ms"], 2)
    engine._decode_step = None  # its state is spent
    return out


def agreement(loaded, rows: list[SynthesisRequest], frames: int) -> dict:
    """Greedy codes of the fast path against the plain path on the same rows: identical on CPU in float32
    (tests/test_slot_cache.py); in bf16 on a GPU, masked full-length attention may round differently, and
    with random weights near-tied logits can then flip, so this reports how far rows agree."""
    greedy = [replace(r, temperature=0.0, max_new_tokens=frames + 8) for r in rows]
    fast = engine_for(loaded, "graphs").generate(greedy)
    plain = engine_for(loaded, "dynamic").generate(greedy)
    agree = []
    for a, b in zip(fast, plain, strict=True):
        same = (a.audio_codes == b.audio_codes).all(axis=0)
        agree.append(int(same.argmin()) if not same.all() else int(same.size))
    return {"rows": len(rows), "frames": frames, "identical_rows": agree.count(frames),
            "frames_identical_before_first_difference": agree}  # fmt: skip


def exactness(device: torch.device, mode: str, one_voice: bool = False) -> dict:
    """The fast path's mechanics (slots, graphs of several buckets as rows leave, refill, rows ending on
    stream-eos between looks, a reference turn prefilled once for the rows sharing it) against the plain
    path, on the tiny config in float32, where both must give the same codes (tests/test_slot_cache.py
    asserts it on CPU)."""
    loaded = random_checkpoint("tiny", device, torch.float32)
    codes = np.random.default_rng(0).integers(0, 64, size=(loaded.model.config.num_codebooks, 60))
    voice = [ContextTurn(text="A reference sentence in the shared voice.", codes=codes)]
    rows = [
        SynthesisRequest(
            id=f"t{i}",
            text=f"Sentence number {i} is spoken here.",
            seed=i,
            max_new_tokens=m,
            context=voice if i % 2 else [],
        )
        for i, m in enumerate([12, 19, 26, 33, 200, 200, 200, 200, 200, 200])
    ]
    if one_voice:  # or there is no call-wide prefix to keep once
        rows = [replace(r, context=voice) for r in rows]
    fast = SynthesisEngine(loaded, EngineOptions(max_batch_size=4, **MODES[mode]))
    plain = SynthesisEngine(loaded, EngineOptions(max_batch_size=4, **MODES["dynamic"]))
    few_slots = {"MIN_PREFIX_CACHE_ROWS": 1, "attention.MIN_OWN_COLUMNS_SLOTS": 1}  # 4 slots here
    with engine_constants(few_slots), mode_constants(mode):
        a, b = fast.generate(rows), plain.generate(rows)
    same = [x.ok and y.ok and np.array_equal(x.audio_codes, y.audio_codes) for x, y in zip(a, b, strict=True)]
    return {
        "rows": len(rows),
        "identical_rows": sum(same),
        "frames": [x.generated_frames for x in a],
        "cuda_graph_buckets": fast._decode_step.captured if fast._decode_step else [],
    }


# The exactness checks (exactness()): each a mode, and whether all rows clone one voice, so that a call keeps
# their shared prefix once.
EXACTNESS = {
    "graphs": ("graphs", False),
    "prefix_once": ("graphs", True),
    "fused": ("fused", False),
    "compiled": ("compiled", False),
    "split_prefix_once": ("split_efficient", True),
    "bmm": ("bmm", False),
    "bmm_prefix_once": ("bmm", True),
    "prefill_beside": ("prefill_beside", False),
    "prefill_beside_prefix_once": ("prefill_beside", True),
}


def profile_steps(loaded, mode: str, batch: int, rows: list[SynthesisRequest], steps: int = 8) -> dict:
    """Where a decode step's time goes: `steps` steps of `batch` rows (prompts prefilled, a call-wide prefix
    kept once where the engine keeps it) run eagerly under torch.profiler, whose kernels are the ones a CUDA
    graph replays. Returns the GPU time per step and the top operators by their own GPU time."""
    from model.slot_cache import round_up

    options = {**MODES[mode], "cuda_graphs": False, "compile": False}
    engine = SynthesisEngine(loaded, EngineOptions(ignore_eos=True, max_batch_size=batch, **options))
    step, state = prefilled(engine, rows[:batch])
    widest, any_ras = state.sampling_shape
    span = round_up(state.length + steps + 1)
    step(batch, span, widest, any_ras)  # lazy initialisation outside the profile

    def work() -> None:
        for _ in range(steps):
            step(batch, span, widest, any_ras)

    return {
        "mode": mode,
        "batch_size": batch,
        "span": span,
        "prefix_span": step.cache.prefix_span,
        **profiled(engine.device, work, steps),
    }


def profile_prefill(loaded, mode: str, batch: int, rows: list[SynthesisRequest]) -> dict:
    """Where one prefill forward's time goes: `batch` rows of one voice (their shared prefix run once, as
    the engine's prefill groups do), after one unprofiled prefill of the same rows."""
    from model.slot_batch import SlotBatch

    engine = SynthesisEngine(loaded, EngineOptions(ignore_eos=True, max_batch_size=batch, **MODES[mode]))
    prepared, prefix, step = slotted(engine, rows[:batch])

    def work() -> None:
        step.cache.reset()
        SlotBatch(step).merge(engine._prefill(prepared, prefix))  # the copy into the slots included

    work()
    shared = prefix.tokens if prefix else engine._shared_prefix(prepared)
    return {
        "mode": mode,
        "batch_size": batch,
        "prompt_tokens": max(len(p.input_ids) for p in prepared),
        "shared_tokens": shared,  # run once for all rows (prefix.tokens, or the group's in _prefill)
        **profiled(engine.device, work, 1),
    }


def prefill_routing(
    loaded, mode: str, sizes: list[int], rows: list[SynthesisRequest], repeats: int = 5
) -> list:
    """One prefill group's wall time (its shared prefix's forward included, as the engine's prefill groups
    run it) with tokens routed to the text and audio weights by boolean masks, as transformers' layers do,
    against by index lists (model.token_routing): the masks make the CPU wait for the GPU ~8 times a layer,
    which a small group (a refill) pays in full. Medians of `repeats`, the two alternating."""
    from model.token_routing import use_indexed_routing

    engine = SynthesisEngine(loaded, EngineOptions(ignore_eos=True, **MODES[mode]))
    out = []
    try:
        for size in sizes:
            prepared = [engine._prepare(i, r) for i, r in enumerate(rows[:size])]
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(repeats + 1):  # the first of each is a warm-up
                for indexed in (False, True):
                    use_indexed_routing(engine.model, indexed)
                    engine._sync()
                    started = time.perf_counter()
                    with torch.inference_mode():
                        engine._prefill(prepared)
                    engine._sync()
                    times[indexed].append(time.perf_counter() - started)
            masked, indexed = (sorted(times[k][1:])[repeats // 2] for k in (False, True))
            out.append(
                {
                    "rows": size,
                    "masks_ms": round(masked * 1e3, 2),
                    "indices_ms": round(indexed * 1e3, 2),
                    "speedup": round(masked / indexed, 3),
                }
            )
    finally:
        use_indexed_routing(engine.model)
    return out


def profiled(device: torch.device, work, repeats: int) -> dict:
    """`work` run under torch.profiler: wall and kernel milliseconds per repeat, and the 20 operators and
    kernels with the most time of their own. On a GPU each kernel's time also shows under the operator that
    launched it, so the total counts kernels alone."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        work()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - started
    events = prof.key_averages()

    def own_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    kernels = [e for e in events if not cuda or e.device_type == DeviceType.CUDA]
    top = sorted(events, key=own_us, reverse=True)[:20]
    return {
        "clock": "gpu" if cuda else "cpu",
        "wall_ms": round(wall / repeats * 1e3, 3),
        "step_ms": round(sum(own_us(e) for e in kernels) / repeats / 1e3, 3),
        "kernels_per_step": round(sum(e.count for e in kernels) / repeats, 1) if cuda else None,
        "top": [
            {
                "op": e.key[:80],
                "ms_per_step": round(own_us(e) / repeats / 1e3, 3),
                "calls_per_step": e.count / repeats,
            }
            for e in top
        ],
    }


def parse_refill_run(text: str, share: float) -> tuple[int, int, float]:
    """`auto:512` or `128:512`: (slots, 0 for auto; rows per call; REFILL_SHARE)."""
    slots, _, per_call = text.partition(":")
    return (0 if slots == "auto" else int(slots), int(per_call), share)


def release(device: torch.device) -> None:
    """Free what finished measurements left: engines hold their slots through reference cycles."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_modes(text: str, first_sizes: str, later_sizes: str) -> list[tuple[str, list[int]]]:
    """`graphs,static` (the first mode at --batch-sizes, later ones at --plain-batch-sizes) or
    `graphs=1/128/256,compiled=1` (each mode its own sizes)."""
    modes = []
    for i, item in enumerate(filter(None, text.split(","))):
        name, _, sizes = item.partition("=")
        sizes = sizes.replace("/", ",") or (first_sizes if i == 0 else later_sizes)
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; modes: {', '.join(MODES)}")
        modes.append((name, [int(n) for n in sizes.split(",")]))
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument(
        "--modes", default="compiled,graphs,static,dynamic", help=f"any of {', '.join(MODES)}"
    )
    parser.add_argument(
        "--plain-batch-sizes", default="1,32,128", help="batch sizes for every mode after the first"
    )
    parser.add_argument("--refill-rows", type=int, default=0, help="rows of mixed length (0: skip)")
    parser.add_argument("--refill-slots", type=int, default=0, help="their slots (0: the largest batch)")
    parser.add_argument("--refill-slot-by-slot", action="store_true", help="also refill without grouping")
    parser.add_argument(
        "--refill-runs", default="", help="instead: slots:rows per call, e.g. auto:512,128:512"
    )
    parser.add_argument("--refill-modes", default="", help="modes of the refill runs (default: the first)")
    # pipeline.dataset_job.AUTO_CALL_ROWS; not imported: the GPU machine lacks the pipeline's dependencies.
    parser.add_argument("--auto-call-rows", type=int, default=512, help="rows per call with batch_size auto")
    parser.add_argument("--voices", type=int, default=0, help="voice-library run: this many voices (0: skip)")
    parser.add_argument("--voice-rows", type=int, default=256, help="rows of the voice-library run")
    parser.add_argument(
        "--chunk-rows", type=int, default=0, help="audiobook-like rows with context (0: skip)"
    )
    parser.add_argument("--span-batch", type=int, default=128, help="rows of the span check (0: skip)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip transformers'")
    parser.add_argument("--profile", default="", help="batch sizes whose decode step is profiled, e.g. 1,256")
    parser.add_argument(
        "--profile-measured",
        action="store_true",
        help="after each --modes measurement, one more call under torch.profiler (kernels per decode step)",
    )
    parser.add_argument(
        "--profile-prefill", default="", help="batch sizes whose prefill is profiled, e.g. 64"
    )
    parser.add_argument(
        "--prefill-routing",
        default="",
        help="prefill group sizes timed with both token routings, e.g. 1,8,64",
    )
    parser.add_argument(
        "--check-rows", type=int, default=4, help="rows of the greedy agreement check (0: no checks)"
    )
    parser.add_argument(
        "--exactness",
        default="",
        help=f"only these exactness checks, without the greedy agreement: any of {', '.join(EXACTNESS)}",
    )
    parser.add_argument("--budget-s", type=float, default=420, help="skip what would start after this")
    parser.add_argument("--frames", type=int, default=250, help="frames generated per row (10 s)")
    parser.add_argument("--text-tokens", type=int, default=300)
    parser.add_argument("--ref-frames", type=int, default=250)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    chosen = [name for name in args.exactness.split(",") if name]
    if unknown := set(chosen) - set(EXACTNESS):
        raise SystemExit(f"unknown exactness checks {sorted(unknown)}; checks: {', '.join(EXACTNESS)}")
    device = resolve_device(args.device)
    started = time.perf_counter()
    loaded = random_checkpoint("real" if args.config == "real" else "tiny", device)
    tokenizer = loaded.processor.tokenizer
    modes = parse_modes(args.modes, args.batch_sizes, args.plain_batch_sizes)
    sizes = sorted({n for _, mode_sizes in modes for n in mode_sizes})
    step_profiles = [int(n) for n in args.profile.split(",") if n]
    prefill_profiles = [int(n) for n in args.profile_prefill.split(",") if n]
    routing_sizes = [int(n) for n in args.prefill_routing.split(",") if n]
    most = max(
        [*sizes, *step_profiles, *prefill_profiles, *routing_sizes, args.span_batch, args.check_rows, 1]
    )
    rows = requests(most, args.frames, args.text_tokens, args.ref_frames, tokenizer)
    report = {
        **header("gpu_engine", device),
        "config": args.config,
        "transformers": transformers.__version__,
        "parameters_b": round(sum(p.numel() for p in loaded.model.parameters()) / 1e9, 3),
        "build_s": round(time.perf_counter() - started, 1),
        "engine": [],
    }

    def save() -> None:
        report["total_s"] = round(time.perf_counter() - started, 1)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    def attempt(name: str, work):
        if time.perf_counter() - started > args.budget_s:
            return {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not lose the others
            return {"error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            release(device)  # an engine's slots and CUDA graphs, before the next measurement
            print(f"[{time.perf_counter() - started:6.1f} s] {name} done", file=sys.stderr, flush=True)

    report["baseline_transformers_generate"] = (
        attempt("baseline", lambda: baseline_generate(engine_for(loaded, "dynamic"), args.frames, rows[0]))
        if args.baseline
        else {"skipped": "--no-baseline"}
    )
    save()
    for mode, mode_sizes in modes:
        engine = engine_for(loaded, mode)
        for size in mode_sizes:
            with mode_constants(mode):
                run = attempt(
                    f"{mode} b{size}",
                    lambda e=engine, n=size: measure(e, n, args.frames, rows, profile=args.profile_measured),
                )
            report["engine"].append({"mode": mode, "batch_size": size, **run})
            print(json.dumps(report["engine"][-1]), file=sys.stderr, flush=True)
            save()
        del engine
        release(device)
    first = modes[0][0] if modes else "graphs"
    report["profile"] = []
    for size in step_profiles:
        # The default keeps the rows' shared prefix once from MIN_PREFIX_CACHE_ROWS rows; whole_prompts never.
        for mode in dict.fromkeys([first, *(m for m, _ in modes if m == "whole_prompts")]):
            run = attempt(f"profile {mode} b{size}", lambda m=mode, n=size: profile_steps(loaded, m, n, rows))
            report["profile"].append({"mode": mode, "batch_size": size, **run})
            save()
    report["profile_prefill"] = []
    for size in prefill_profiles:
        run = attempt(f"profile prefill b{size}", lambda n=size: profile_prefill(loaded, first, n, rows))
        report["profile_prefill"].append({"mode": first, "batch_size": size, **run})
        save()
    if routing_sizes:
        report["prefill_routing"] = attempt(
            "prefill routing", lambda: prefill_routing(loaded, first, routing_sizes, rows)
        )
        print(json.dumps(report["prefill_routing"]), file=sys.stderr, flush=True)
        save()
    if args.refill_rows:
        # Rows per call as runtime.rows_per_call sets them in a dataset job: the slots alone (no refill within
        # a call), then 4 x the slots (the default) with refills in groups (slot by slot, REFILL_SHARE 0, with
        # --refill-slot-by-slot); then runtime.batch_size=auto: the slots that fit free memory, in calls of
        # --auto-call-rows.
        # --refill-runs auto:512,128:512 names the runs instead (slots:rows per call), --refill-modes the
        # engine modes that make each of them.
        slots = args.refill_slots or max(sizes, default=128)
        report["continuous_batching"] = []
        grouped = admission.REFILL_SHARE
        runs = [(slots, slots, 0.0), (slots, 4 * slots, grouped)]
        runs += [(slots, 4 * slots, 0.0)] if args.refill_slot_by_slot else []
        runs += [(0, args.auto_call_rows, grouped)]
        if args.refill_runs:
            runs = [parse_refill_run(item, grouped) for item in args.refill_runs.split(",")]
        for mode in args.refill_modes.split(",") if args.refill_modes else [first]:
            engine = engine_for(loaded, mode)
            for batch, per_call, share in runs:
                run = attempt(
                    f"refill {mode} {batch or 'auto'} slots, {per_call} per call, share {share:g}",
                    lambda e=engine, b=batch, n=per_call, s=share, m=mode: measure_refill(
                        e, b, args.refill_rows, rows, n, s, m
                    ),
                )
                report["continuous_batching"].append({"mode": mode, **run})
                print(json.dumps(report["continuous_batching"][-1]), file=sys.stderr, flush=True)
                save()
            del engine
            release(device)
    if args.voices:
        report["voice_library"] = attempt(
            "voice library",
            lambda: measure_voice_library(
                engine_for(loaded, first), max(sizes, default=0), args.voices, rows, args.voice_rows
            ),
        )
        save()
    if args.chunk_rows:
        report["audiobook_chunks"] = attempt(
            "audiobook chunks",
            lambda: measure_chunks(engine_for(loaded, first), max(sizes, default=0), rows, args.chunk_rows),
        )
        save()
    if args.span_batch:
        report["step_time_by_span"] = attempt(
            "span", lambda: step_time_by_span(engine_for(loaded, first), args.span_batch, rows)
        )
        save()
    if args.check_rows or chosen:
        for name in chosen or EXACTNESS:
            mode, one_voice = EXACTNESS[name]
            report[f"exactness_tiny_fp32_{name}"] = attempt(
                f"exactness {name}", lambda m=mode, v=one_voice: exactness(device, m, v)
            )
    if args.check_rows:
        report["agreement_greedy"] = attempt(
            "agreement", lambda: agreement(loaded, rows[: args.check_rows], min(args.frames, 40))
        )
    base = report["baseline_transformers_generate"].get("frames_per_s")
    for run in report["engine"]:
        if base and "frames_per_s" in run:
            run["speedup_vs_transformers_b1"] = round(run["frames_per_s"] / base, 2)
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
