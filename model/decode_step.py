"""One decode step over the first `b` slots of a SlotCache: choose every row's next frame, record it, and run
the model on it. Eager on CPU; on a GPU captured once per shape as a CUDA graph and replayed.

A decode step of the release model is ~28 layers of small kernels plus ~50 more for sampling; at small
batches launching them costs more than running them, and a step that asks the GPU anything (has a row
finished?) cannot be queued ahead. Replaying a graph is one launch, and the engine only looks at which rows
finished every few steps. Buckets are powers of two (and the cache's slot count), so a handful of graphs
serve every batch. With `compile`, torch.compile fuses the step's ~600 small kernels (norms, rotary
embeddings, sampling) before the graph is captured; the step has no graph break, so it compiles whole.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import nullcontext
from dataclasses import fields

import torch

from model import attention
from model.sampling import RowParams, advance_counters, select_next_frame
from model.slot_cache import SlotCache

log = logging.getLogger(__name__)
ROW_PARAMS = tuple(f.name for f in fields(RowParams))


def bucket_for(rows: int, slots: int) -> int:
    """The smallest power of two holding `rows`, at most `slots`, and at least 2 where there are 2 slots: a
    compiled step specializes on a batch of one row (dynamo's 0/1 specialization) and would be compiled again
    for the last row of a call."""
    bucket = 2
    while bucket < rows:
        bucket *= 2
    return min(bucket, slots)


# Whether a one-slot step compiles with inductor's coordinate-descent tuning (compile_options); bench_gpu's
# `compiled_int8_untuned` mode turns it off.
TUNE_ONE_SLOT = True


def compile_options(cache: SlotCache) -> dict:
    """torch.compile's options for the step over `cache`. For one slot on a GPU (one request at a time),
    inductor's coordinate-descent tuning: with it, a matrix product of one row becomes a multiply-and-sum
    reduction (inductor's mm decomposition), which reads the weights at closer to the memory's bandwidth than
    cuBLAS's split-K matrix-vector kernels (2.1 of ~3.3 TB/s on an H100 at one row, GPU run 5), and the
    tuning picks the block sizes of every reduction (the norms', the sampling's). GPU run 9 (H200, int8
    weights through inductor's reductions): 12.4x real time tuned against 9.8x untuned, compiled in 126 s
    against 90 s (61 s from inductor's on-disk cache). Larger caches compile untuned, as before."""
    if cache.mask.device.type == "cuda" and cache.slots == 1 and TUNE_ONE_SLOT:
        return {"options": {"coordinate_descent_tuning": True}}
    return {}


class DecodeStep:
    def __init__(
        self,
        model,
        cache: SlotCache,
        cuda_graphs: bool,
        stream_bos: int,
        stream_eos: int,
        ignore_eos: bool,
        compile: bool = False,
        capture_lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.cuda_graphs = cuda_graphs and cache.mask.device.type == "cuda"
        # Compiled once with a symbolic batch, so every bucket shares one compilation (a graph per bucket is
        # still captured from it); fullgraph: a graph break would split the step back into small launches.
        self._compiled = None
        self.compile_failed = False
        if cache.prefix_capacity and not attention.use_packed_sdpa(model):
            raise ValueError("a shared prefix in the KV cache needs the model on sdpa attention")
        # Each row reads only its own columns in use (model.attention.own_columns_attention), on sdpa models.
        own = attention.reads_own_columns(cache.slots, cache.mask.device)
        self.own_columns = own and attention.use_packed_sdpa(model)
        if compile:
            # transformers' sdpa repeats keys/values for every head when compiled
            attention.use_packed_sdpa(model)
            self._compiled = torch.compile(self._step, fullgraph=True, dynamic=True, **compile_options(cache))
        self.stream_bos, self.stream_eos, self.ignore_eos = stream_bos, stream_eos, ignore_eos
        self.num_codebooks = model.config.num_codebooks
        self.dtype = next(model.parameters()).dtype
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        # Held while capturing: other threads (the engine's vocoding beside the decode) must not touch the
        # GPU meanwhile.
        self._capture_lock = capture_lock or nullcontext()

    @property
    def captured(self) -> list[int]:
        """The batch buckets with a captured graph."""
        return sorted({key[0] for key in self._graphs})

    def __call__(self, rows: int, span: int, widest_top_k: int, any_ras: bool) -> None:
        """Advance the first b >= rows slots by one frame, attending to their first `span` columns (every
        column a row writes before the engine next looks must lie below it). The span and the sampling shape
        (how many logits the widest top-k sorts, whether RAS runs) are fixed per graph: part of its key, with
        the shared prefix's span."""
        key = (bucket_for(rows, self.cache.slots), span, widest_top_k, any_ras, self.cache.prefix_span)
        if not self.cuda_graphs:
            return self._run(*key)
        if key not in self._graphs:
            try:
                with self._capture_lock:
                    self._capture(key)
            except RuntimeError as exc:
                # Graphs only speed the step up; a step that cannot be captured still runs eagerly.
                log.warning("decode step not captured as a CUDA graph (%s); running it eagerly", exc)
                self.cuda_graphs = False
                torch.cuda.synchronize()
                return self._run(*key)
        self._graphs[key].replay()

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def _run(self, b: int, span: int, widest_top_k: int, any_ras: bool, prefix_span: int) -> None:
        if self._compiled is not None:
            try:
                return self._compiled(b, span, widest_top_k, any_ras, prefix_span)
            except Exception as exc:
                from torch._dynamo.exc import TorchDynamoException  # imported by torch.compile already

                if not isinstance(exc, TorchDynamoException):
                    raise
                # Raised while tracing or compiling a new shape, before the step has changed any state.
                log.warning("decode step not compiled (%s); running it uncompiled", str(exc).splitlines()[0])
                self._compiled = None
                self.compile_failed = True
        return self._step(b, span, widest_top_k, any_ras, prefix_span)

    def _step(self, b: int, span: int, widest_top_k: int, any_ras: bool, prefix_span: int) -> None:
        c = self.cache
        for layer in c.layers:
            layer.span = span
        rows = c.rows[:b]
        params = RowParams(**{name: getattr(c, name)[:b] for name in ROW_PARAMS})
        steps = c.steps[:b]
        eos_steps = c.eos_steps[:b]
        frame = select_next_frame(
            c.logits[:b], params, steps, eos_steps, c.history[:b], steps, self.stream_bos, self.stream_eos,
            self.ignore_eos, widest_top_k, any_ras,
        )  # fmt: skip

        c.frames[rows, steps.clamp(max=c.max_steps)] = frame
        if c.window:
            c.history[:b] = torch.cat([c.history[:b, 1:], frame[:, None, :]], dim=1)
        new_eos_steps, new_steps, finished = advance_counters(
            frame, steps, eos_steps, c.step_limit[:b], self.stream_eos
        )
        eos_steps.copy_(new_eos_steps)
        steps.copy_(new_steps)
        done_at = c.done_at[:b]
        done_at.copy_(torch.where((done_at < 0) & finished, steps, done_at))

        c.audio_in[:b, 0] = frame
        c.position_in[:b] += 1
        write_pos = c.write_pos[:b]
        c.mask[:b].scatter_(1, write_pos[:, None], True)  # a scalar fill: no host-to-device copy in a graph
        c.logits[:b] = self._forward(b, span, prefix_span)
        # A finished row steps on until the engine looks; its writes stay inside its own slot.
        write_pos.copy_((write_pos + 1).clamp(max=c.length - 1))

    def _forward(self, b: int, span: int, prefix_span: int) -> torch.Tensor:
        cache = self.cache
        mask = torch.zeros((b, 1, 1, span), dtype=self.dtype, device=cache.mask.device)
        mask.masked_fill_(~cache.mask[:b, None, None, :span], torch.finfo(self.dtype).min)
        # The shared prefix and the rows' columns reach model.attention through the model's keyword arguments.
        extra = {"slot_prefix": cache} if prefix_span else {}
        if self.own_columns:
            # A slot's columns in use are its first ones, up to the one this step writes (SlotCache.load).
            extra["slot_columns"] = (cache.write_pos[:b] + 1).clamp(max=span)
        out = self.model(
            audio_input_ids=cache.audio_in[:b],
            attention_mask=mask,
            position_ids=cache.position_in[:b],
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :].view(b, self.num_codebooks, -1)

    def _capture(self, key: tuple) -> None:
        """Record one step as a graph. The warm-up that capturing requires runs on a copy of the state, so
        the first replay is the step's only effect."""
        started = time.perf_counter()
        c = self.cache
        saved = {name: t.clone() for name, t in _state(c).items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(*key)  # compilation, cuBLAS workspaces and lazy initialisation, outside the graph
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._run(*key)
        self._pool = graph.pool()
        for name, t in _state(c).items():
            t.copy_(saved[name])
        self._graphs[key] = graph
        log.info("captured the decode step for %d slots in %.2f s", key[0], time.perf_counter() - started)


def _state(c: SlotCache) -> dict[str, torch.Tensor]:
    """Every buffer a step changes, except the keys/values it appends (rewritten identically on replay)."""
    names = ("logits", "steps", "eos_steps", "done_at", "history", "frames", "audio_in", "position_in")
    return {name: getattr(c, name) for name in (*names, "mask", "write_pos")}
