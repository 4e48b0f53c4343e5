"""The batched synthesis engine: many requests through one forward batch of Higgs Audio v2.

transformers' own `generate` cannot serve a mixed batch (a row without reference audio breaks the
processor's torch.cat), shares one RNG across rows and one set of sampling parameters for all. The engine
therefore prepares each row itself (chat template, reference codes with the delay pattern), runs the model's
forward in a left-padded batch and selects every row's next frame with its own parameters and seed.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, partial

import numpy as np
import torch
from transformers import DynamicCache

from model import admission
from model.attention import use_packed_sdpa
from model.batch_state import DynamicBatch
from model.checkpoint import LoadedCheckpoint, load_checkpoint
from model.decode_step import DecodeStep
from model.fused_projections import use_fused_projections
from model.int8_weights import use_int8_weights
from model.lru import LRUCache
from model.options import CheckpointSpec, EngineOptions
from model.prompts import build_conversation, check_control_tokens, control_tokens, render
from model.reference_audio import content_hash, decode_reference
from model.requests import Reference, RequestError, SynthesisRequest, SynthesisResult, check_parameters
from model.rms_norm import use_fused_rms_norms
from model.sampling import RowParams
from model.slot_batch import SlotBatch
from model.slot_cache import SlotCache, round_up
from model.speech_length import estimate_seconds
from model.token_routing import use_indexed_routing
from model.vocoding import margin_for, probe_reach, vocode_rows
from model.vocoding_groups import VocodingGroups

log = logging.getLogger(__name__)

# Given a request and its result (codes, not yet audio), the request to generate next, or None.
Follow = Callable[[SynthesisRequest, SynthesisResult], SynthesisRequest | None]
# A request's priority among the waiting rows of a call: the highest goes first.
Priority = Callable[[SynthesisRequest], float]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Key + value bytes one context token costs across all layers (~112 KB for the release in bf16)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = torch.finfo(dtype).bits // 8
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * width


def audio_steps(frames: int, num_codebooks: int) -> int:
    """Decode steps a row takes for `frames` frames of audio: the opening bos frame and the delay pattern's
    staircase come on top."""
    return frames + 1 + num_codebooks


def slot_reserve(estimated_steps: int, limit: int) -> int:
    """The decode steps a slot is sized for, for a row estimated at `estimated_steps` under its max_new_tokens
    `limit`: all of `limit` where the estimate is over half of it. Under half the slot saved is not worth it:
    a row that runs on to max_new_tokens would do twice the work (on the tiny checkpoint, whose random rows
    often do, that cost 0.86x with 10 of 48 run again)."""
    return estimated_steps if 2 * estimated_steps <= limit else limit


def fitting_batch_size(
    config,
    dtype: torch.dtype,
    free_bytes: int,
    context_tokens: int,
    prompt_tokens: int = 0,
    prefill_rows: int = 64,
    headroom: float = 0.2,
    cap: int = 256,
) -> int:
    """The largest batch that fits in free memory. A row holds its KV slot of `context_tokens`, and the
    `prefill_rows` rows of a prefill hold their prompt's keys and values (`prompt_tokens`) while they are
    copied in, each plus a quarter for activations: on an H200 the release took 0.245 GB per row at 1,024 +
    688 tokens (docs/benchmarks.md), 1.25x those keys and values. `headroom` is kept free for the codec and
    the allocator."""
    per_token = 1.25 * kv_bytes_per_token(config, dtype)
    usable = free_bytes * (1 - headroom)
    fits = int(usable // (per_token * (context_tokens + prompt_tokens)))
    if fits > prefill_rows:
        prefill = per_token * prompt_tokens * prefill_rows
        fits = int((usable - prefill) // (per_token * context_tokens))
    return max(1, min(cap, fits))


# Shorter shared prompt prefixes are prefilled with each row: a separate forward would cost more than it saves.
MIN_SHARED_PREFIX = 64
# A call keeps its rows' shared prefix once beside the slots (shared_prefix_cache) from this many rows
# decoding together. Below, reading the prefix apart from the slots costs more than it saves: on an H100, one
# layer's decode attention took 0.45x / 0.92x / 1.21x the time of whole prompts in the slots at 64 / 128 / 256
# rows, and whole 128- and 256-row calls ran 1.005x and 1.014x faster with it (docs/benchmarks.md).
MIN_PREFIX_CACHE_ROWS = 128
# Frames per row of the batch size that one vocoding call takes (windows of all rows together), up to
# VOCODE_MAX_FRAMES: the codec's activations grow with them, and on an H100 windows of 32,768 frames a call
# already vocoded at 1,240x real time (bench_vocoding.py).
VOCODE_FRAMES_PER_ROW = 256
VOCODE_MAX_FRAMES = 32768
# On a CPU, frames a vocoding call takes whatever the slots: larger calls only spill the caches. The release's
# codec vocoded 16 rows of 60 frames at 12.1x / 11.0x / 5.8x / 5.9x real time in calls of 128 / 256 / 1,024 /
# 4,096 frames (bench_vocoding.py --config real, 2-core CPU); the tiny codec 128 rows of 30-34 frames at
# 191x / 168x / 124x / 131x in calls of 256 / 512 / 1,024 / 4,096.
VOCODE_CPU_FRAMES = 256


@dataclass
class _Prefix:
    """Prompt tokens that rows share (a prefill group's, or a whole call's), run through the model once: a
    one-row DynamicCache."""

    tokens: int
    cache: DynamicCache
    ids: list[int]  # the tokens
    audio: torch.Tensor | None  # the audio frames among them

    def covers(self, item: _Prepared) -> bool:
        """Whether `item`'s prompt starts with these tokens and frames (a row that joins a call late)."""
        if item.input_ids[: self.tokens] != self.ids:
            return False
        if self.audio is None:
            return True
        return bool(torch.equal(item.audio_codes[: len(self.audio)], self.audio))

    def for_rows(self, rows: int, config) -> DynamicCache:
        """A DynamicCache holding these keys and values for each of `rows` rows (a prefill's starting point)."""
        cache = DynamicCache(config=config)
        for i, layer in enumerate(self.cache.layers):
            shape = (rows, *layer.keys.shape[1:])
            cache.update(layer.keys.expand(shape).clone(), layer.values.expand(shape).clone(), i)
        return cache


@dataclass
class _Prepared:
    index: int
    request: SynthesisRequest
    input_ids: list[int]
    audio_codes: torch.Tensor | None  # (frames, codebooks), delay pattern applied, stream bos/eos added
    encode_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    # The prompt's first audio (a reference clip, or else a context turn), hashed: rows with equal voices can
    # share their prompt's leading tokens (SynthesisEngine._shared_prefix). None without audio.
    voice: bytes | None = None
    run: int = -1  # the voice run it prefills in (model.admission.order); -1: with the rows of no run
    priority: float = 0.0  # among the waiting rows, the highest first (generate_chained)
    reserve: int = 0  # steps of audio its KV slot is sized for (SynthesisEngine._reserve)


class SynthesisEngine:
    """Turns SynthesisRequests into SynthesisResults; one per actor, model and audio tokenizer loaded once."""

    def __init__(self, checkpoint: LoadedCheckpoint, options: EngineOptions | None = None) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.processor = checkpoint.processor
        self.options = options or EngineOptions()
        config = self.model.config
        self.num_codebooks = config.num_codebooks
        self.stream_bos = config.audio_stream_bos_id
        self.stream_eos = config.audio_stream_eos_id
        self.eos_text_id = config.eos_token_id
        self.pad_id = config.pad_token_id
        self.max_context = config.max_position_embeddings
        self.sample_rate = int(self.processor.audio_tokenizer.config.sample_rate)
        self.reference_cache = LRUCache(self.options.reference_cache_size)
        self._decode_step: DecodeStep | None = None
        # Held by each codec call that may run beside the decoding (vocoding, overlap_vocoding; encoding
        # another call's reference clips) and by each CUDA graph capture: a capture fails if another thread
        # syncs or queries the GPU meanwhile.
        self._capture_lock = threading.Lock()
        # One call decodes at a time: its slots are sized from the free memory. Another call prepares beside
        # it (its reference clips encoded on the codec's stream), so a synthesis actor that takes two calls
        # at once (pipeline.dataset_job.CALLS_PER_GPU_ACTOR) keeps the GPU decoding while it encodes.
        self._decoding = threading.Lock()
        # The CUDA stream codec calls beside the decoding queue on (_beside_decoding): one per engine, as the
        # caching allocator keeps the blocks freed on a stream for that stream; made here, not on first use,
        # as two threads may first use it at once. None (the current stream) off a GPU.
        self._codec_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # The CUDA stream refills prefill on while the running rows' decode steps run (overlap_prefill).
        self._prefill_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._compile = self.options.compile  # off once a step has failed to compile: the next would too
        use_indexed_routing(self.model)  # bit for bit transformers' layers, without their waits in prefill

    @classmethod
    def from_spec(cls, spec: CheckpointSpec, options: EngineOptions | None = None) -> SynthesisEngine:
        return cls(load_checkpoint(spec), options)

    @property
    def device(self) -> torch.device:
        return self.checkpoint.device

    # ---------------------------------------------------------------- preparation

    def encode_reference(self, ref: Reference) -> torch.Tensor:
        """(codebooks, frames) codes of a reference clip, encoded once per distinct content."""
        key = ref.cache_key or content_hash(ref.audio, ref.sample_rate)
        cached = self.reference_cache.get(key)
        if cached is not None:
            return cached
        waveform = decode_reference(
            ref.audio,
            self.sample_rate,
            sample_rate=ref.sample_rate,
            max_seconds=self.options.max_reference_seconds,
        )
        tokenizer = self.processor.audio_tokenizer
        with torch.inference_mode(), self._beside_decoding():
            values = torch.from_numpy(waveform).to(self.device, tokenizer.dtype)[None, None, :]
            codes = tokenizer.encode(values).audio_codes[0].to("cpu")
        self.reference_cache.put(key, codes)
        return codes

    @contextmanager
    def _beside_decoding(self) -> Iterator[None]:
        """A codec call that may run beside another thread's decoding: holding the capture lock, its kernels
        queued on the codec's own stream."""
        with self._capture_lock, torch.cuda.stream(self._codec_stream):
            yield

    def prepare(self, request: SynthesisRequest) -> tuple[list[int], torch.Tensor | None]:
        """The prompt token ids and the delayed audio codes (frames, codebooks) a request is generated from."""
        prepared = self._prepare(0, request)
        return prepared.input_ids, prepared.audio_codes

    def _prepare(self, index: int, request: SynthesisRequest, priority: Priority | None = None) -> _Prepared:
        check_parameters(request)
        check_control_tokens(request, self._control_tokens)
        conversation = build_conversation(request)
        text = render(conversation, self.processor)
        started = time.perf_counter()
        delayed = []
        for kind, i in conversation.audio_order:
            if kind == "context":
                codes = self._context_codes(request.context[i].codes, i)
            else:
                ref = request.references[i]
                try:
                    codes = ref.codes if ref.codes is not None else self.encode_reference(ref)
                except RequestError as err:
                    raise RequestError(f"references[{i}].audio", err.reason) from err
            framed = torch.cat(
                [
                    torch.full((codes.shape[0], 1), self.stream_bos, dtype=codes.dtype),
                    codes,
                    torch.full((codes.shape[0], 1), self.stream_eos, dtype=codes.dtype),
                ],
                dim=1,
            )
            delayed.append(self.processor.build_delay_pattern(framed[None])[0].transpose(0, 1))
        encode_s = time.perf_counter() - started
        input_ids = self._widen_placeholders(
            self.processor.tokenizer(text, add_special_tokens=False).input_ids, [len(d) for d in delayed]
        )
        budget = len(input_ids) + request.max_new_tokens
        if budget > self.max_context:
            raise RequestError(
                "max_new_tokens",
                f"prompt of {len(input_ids)} tokens + max_new_tokens {request.max_new_tokens} exceeds the "
                f"model's context of {self.max_context} tokens; shorten the text or references",
                request.max_new_tokens,
            )
        audio = torch.cat(delayed, dim=0) if delayed else None
        voice = hashlib.blake2b(delayed[0].numpy().tobytes(), digest_size=16).digest() if delayed else None
        return _Prepared(
            index=index,
            request=request,
            input_ids=input_ids,
            audio_codes=audio,
            encode_s=encode_s,
            voice=voice,
            reserve=self._reserve(request),
            priority=0.0 if priority is None else float(priority(request)),
        )

    def _widen_placeholders(self, ids: list[int], frames: list[int]) -> list[int]:
        """The prompt's ids with each clip's one placeholder widened to its `frames`, as the processor's
        get_audio_tokens spells them. Tokenizing the rendered text with one placeholder a clip and widening
        after gives the same ids as tokenizing the widened text (special tokens split off whole) for a
        fraction of the tokenizer's work: a 10 s clip is 258 placeholders."""
        config = self.model.config
        audio, delay = config.audio_token_id, config.audio_delay_token_id
        staircase = [delay] * (self.num_codebooks - 1)
        if ids.count(audio) != len(frames):
            raise RuntimeError(f"{ids.count(audio)} audio placeholders in the prompt for {len(frames)} clips")
        widths = iter(frames)
        widened: list[int] = []
        for token in ids:
            if token == audio:
                widened += [audio] * (next(widths) - len(staircase)) + staircase
            else:
                widened.append(token)
        return widened

    def _reserve(self, request: SynthesisRequest) -> int:
        """The decode steps a row's KV slot is sized for (EngineOptions.reserve), at most max_new_tokens; a row
        runs on while its slot has columns left (model.slot_cache.SlotCache.admit). Only slots are sized by
        it: the plain path's cache grows with each row, and rows that ignore stream-eos always run to
        max_new_tokens."""
        limit = request.max_new_tokens
        reserve = self.options.reserve
        if reserve == "max_new_tokens" or self.options.ignore_eos or not self.options.static_cache:
            return limit
        if reserve != "estimate":
            return min(limit, audio_steps(int(reserve), self.num_codebooks))
        frames = math.ceil(estimate_seconds(request.text) * self._frame_rate)
        return slot_reserve(audio_steps(frames, self.num_codebooks), limit)

    @cached_property
    def _control_tokens(self):
        return control_tokens(self.processor.tokenizer)

    @cached_property
    def _frame_rate(self) -> float:
        return float(self.processor.audio_tokenizer.config.frame_rate)

    def _context_codes(self, codes, i: int) -> torch.Tensor:
        """A context turn's codes, checked: an out-of-range code would index past the embedding table, which
        on a GPU is a device-side assert that takes every later request on that GPU down with it."""
        array = np.asarray(codes)
        if (
            array.ndim != 2
            or array.shape[0] != self.num_codebooks
            or not np.issubdtype(array.dtype, np.integer)
        ):
            raise RequestError(
                f"context[{i}].codes",
                f"must be integer codes of shape ({self.num_codebooks}, frames), got {array.dtype} {array.shape}",
            )
        if array.size and (array.min() < 0 or array.max() >= self.stream_bos):
            raise RequestError(
                f"context[{i}].codes",
                f"codes must lie in [0, {self.stream_bos}), got {array.min()}..{array.max()}",
            )
        return torch.as_tensor(array, dtype=torch.long)

    # ---------------------------------------------------------------- generation

    def generate(self, requests: list[SynthesisRequest]) -> list[SynthesisResult]:
        """One result per request, in order. A bad request yields an error result; the others go on."""
        results: list[SynthesisResult | None] = [None] * len(requests)
        prepared = self._prepare_all(requests, results)
        with self._decoding_turn(), self._vocoding_groups(chained=False) as groups:
            for item, result in self._decode_all(prepared):
                results[item.index] = result
                groups.add(item.index, result)
            groups.close()
        return [r for r in results if r is not None]

    def generate_chained(
        self, requests: list[SynthesisRequest], follow: Follow, priority: Priority | None = None
    ) -> Iterator[tuple[SynthesisRequest, SynthesisResult]]:
        """(request, result) for `requests` and for every request `follow` names, in the order rows finish.

        `follow(request, result)` is called as each row leaves the batch, with its codes but before its
        audio is decoded, and returns the request to generate next, or None. That request joins the running
        batch as its slots free (continuous batching), so chains of requests that each need the last one's
        codes (a chapter's chunks, model.longform) keep the batch full instead of waiting for each other.
        Waiting requests take free slots in the order of `priority` (highest first): chains with the most
        left to generate first keep the call from ending on a few long ones with its slots idle.
        Results come out in groups as they are vocoded, in calls as large as `generate`'s.
        """
        results: list[SynthesisResult | None] = [None] * len(requests)
        prepared = self._prepare_all(requests, results, priority)
        yield from ((request, r) for request, r in zip(requests, results, strict=True) if r is not None)
        with self._decoding_turn(), self._vocoding_groups(chained=True) as groups:
            for item, result in self._decode_all(prepared, follow=follow, priority=priority):
                groups.add(item.request, result)
                yield from groups.ready()
            yield from groups.close()

    def _prepare_all(
        self,
        requests: list[SynthesisRequest],
        results: list[SynthesisResult | None],
        priority: Priority | None = None,
    ) -> list[_Prepared]:
        """The requests prepared for generation; one that cannot be gets its error in `results`."""
        prepared: list[_Prepared] = []
        for i, request in enumerate(requests):
            outcome = self._try_prepare(i, request, priority)
            if isinstance(outcome, SynthesisResult):
                results[i] = outcome
            else:
                prepared.append(outcome)
        return prepared

    @contextmanager
    def _decoding_turn(self) -> Iterator[None]:
        """This call's turn to decode (see _decoding)."""
        with self._decoding:
            use_fused_rms_norms(self.model, self.options.fused_norms)  # engines may share one model object
            use_fused_projections(self.model, self.options.fused_projections)
            use_int8_weights(self.model, self.options.int8_weights)
            yield

    def _try_prepare(
        self, index: int, request: SynthesisRequest, priority: Priority | None = None
    ) -> _Prepared | SynthesisResult:
        """The request prepared, or the failed result that says why it cannot be."""
        try:
            return self._prepare(index, request, priority)
        except RequestError as err:
            return SynthesisResult(id=request.id, error=err.message, error_field=err.field)
        except Exception as exc:  # noqa: BLE001 - as in decoding: a row's failure must stay its own
            log.warning("request %r could not be prepared: %s", request.id, exc)
            return SynthesisResult(
                id=request.id, error=f"preparing the prompt failed: {exc}", error_field="synthesis"
            )

    def _call_layout(self, prepared: list[_Prepared], size: int | None) -> tuple[_Prefix | None, int]:
        """The call's prefix kept once (see _call_prefix) and its slots: `size`, or as many as fit free
        memory. Where fewer than MIN_PREFIX_CACHE_ROWS slots fit even with the prefix kept once, it is not."""
        prefix = self._call_prefix(prepared, size)
        slots = size or self._batch_size(prepared, prefix)
        if prefix is not None and slots < MIN_PREFIX_CACHE_ROWS:
            return None, size or self._batch_size(prepared)
        return prefix, slots

    def _call_prefix(self, prepared: list[_Prepared], size: int | None) -> _Prefix | None:
        """With `shared_prefix_cache`, the prefix all rows of the call share (see _shared_prefix), run
        through the model once for the whole call; the KV cache then holds it once (model.slot_cache). Only
        when at least MIN_PREFIX_CACHE_ROWS rows decode together (`size` slots; None: as many as fit, see
        _call_layout), and when it makes the slots shorter: a prefix within the slots' rounding (a system
        prompt alone) saves no memory, and a step would read it apart on top of the same slot columns."""
        options = self.options
        if not (options.shared_prefix_cache and options.static_cache):
            return None
        if len(prepared) < MIN_PREFIX_CACHE_ROWS or (size or MIN_PREFIX_CACHE_ROWS) < MIN_PREFIX_CACHE_ROWS:
            return None
        shared = self._shared_prefix(prepared)
        if not shared or self._slot_length(prepared, shared) == self._slot_length(prepared):
            return None
        if not use_packed_sdpa(self.model):  # its decode attention replaces sdpa's
            return None
        return self._run_prefix(prepared[0], shared)

    def _batch_size(self, prepared: list[_Prepared], prefix: _Prefix | None = None) -> int:
        if self.options.max_batch_size > 0:
            return self.options.max_batch_size
        if self.device.type != "cuda" or not prepared:
            return 16
        free, _ = torch.cuda.mem_get_info(self.device)
        # Blocks the caching allocator keeps from earlier calls (prefill, vocoding) are this call's to use: it
        # hands them out or returns them to the driver before it fails. Uncounted, an H100 whose last call
        # vocoded in windows looked full: 52 slots instead of ~250 (docs/benchmarks.md, 2026-11-26).
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if self._decode_step is not None:
            free += self._decode_step.cache.nbytes  # replaced if it does not fit this batch
        prompt = max(len(p.input_ids) for p in prepared)
        length = self._slot_length(prepared, prefix.tokens if prefix else 0)
        return fitting_batch_size(
            self.model.config, self.checkpoint.dtype, free, length, prompt, self.options.max_prefill_rows
        )

    def _order(self, prepared: list[_Prepared]) -> deque[_Prepared]:
        return admission.order(prepared, self.options.share_prefix)

    def _admit(self, waiting: deque[_Prepared], free: int) -> list[_Prepared]:
        return admission.admit(waiting, free, self.options.max_prefill_rows, self.options.max_padding_waste)

    def _refills(self, state, size: int, free: int, waiting: deque[_Prepared]) -> bool:
        return admission.refills(state is not None, self.options.refill, size, free, len(waiting))

    def _group_size(self, state, size: int, free: int) -> int:
        return admission.group_size(state is not None, size, free)

    @torch.inference_mode()
    def _decode_all(
        self,
        prepared: list[_Prepared],
        size: int | None = None,
        follow: Follow | None = None,
        priority: Priority | None = None,
    ):
        """Yield (item, result) as rows finish. Rows leave the batch when done; with `refill`, waiting rows
        join the running batch in their place (continuous batching). Rows that outgrow the slot their text's
        length reserved (EngineOptions.reserve) run again after the others, with all of max_new_tokens.

        `follow(request, result)`, called as each row leaves the batch, may name a request to generate next
        (see generate_chained): it waits with the call's other rows, in its place by `priority`. One that
        does not fit the call's slots (a longer prompt, another prefix) stops the refills instead; once the
        batch has drained, the slots are laid out again for every row left.

        Out of memory: the rows in flight go back to the queue and the batch size halves. A row's codes depend
        only on its request and seed, so restarting it loses time, not correctness. Any other failure is
        narrowed down to the row that causes it by running the rows in flight one at a time.
        """
        waiting = self._order(prepared)
        asked = size
        layout = prepared  # the rows the slots are sized for
        prefix, size = self._call_layout(layout, size)
        fits = self._fitting(layout, prefix)
        state: DynamicBatch | SlotBatch | None = None
        # Rows prefilled ahead of the slots they join (admission.REFILL_SHARE).
        staged: DynamicBatch | None = None
        outgrown: list[_Prepared] = []
        unfit: list[_Prepared] = []  # followers for the next layout
        looks = 0  # the waiting followers have waited (admission.FOLLOWER_LOOKS)

        def finished(pairs):
            for item, result in pairs:
                chain = [(item, result)]
                while chain:
                    item, result = chain.pop()
                    request = follow(item.request, result) if follow is not None else None
                    joining = None if request is None else self._try_prepare(-1, request, priority)
                    if isinstance(joining, SynthesisResult):
                        chain.append((_Prepared(-1, request, [], None), joining))
                    elif joining is not None:
                        if fits(joining):
                            bisect.insort(waiting, joining, key=admission.rank)
                        else:
                            unfit.append(joining)
                    yield item, result

        while waiting or staged is not None or state is not None or unfit or outgrown:
            if state is None and staged is None and (unfit or not waiting):
                # The batch drained: slots for the followers that did not fit, or else (the call's other
                # rows done) for the rows that outgrew theirs.
                if unfit:
                    layout = [*waiting, *unfit]
                    unfit.clear()
                else:
                    log.info(
                        "%d rows outgrew the KV slot their text's length reserved; generating them again "
                        "with their whole max_new_tokens",
                        len(outgrown),
                    )
                    layout = list(outgrown)
                    outgrown.clear()
                waiting = self._order(layout)
                prefix, size = self._call_layout(layout, asked)
                fits = self._fitting(layout, prefix)
            involved: list[_Prepared] = [
                *([] if state is None else state.items),
                *([] if staged is None else staged.items),
            ]
            try:
                free = size - (0 if state is None else len(state))
                # Free slots fill before the next step, from rows prefilled ahead or else from a new prefill
                # group of at most max_prefill_rows rows.
                gathering = (
                    follow is not None
                    and state is not None
                    and len(waiting) < admission.refill_rows(size)
                    and looks < admission.FOLLOWER_LOOKS
                )
                beside: list[_Prepared] = []  # rows to prefill while the running rows' next steps run
                while free > 0 and (
                    staged is not None
                    or (waiting and not (unfit or gathering) and self._refills(state, size, free, waiting))
                ):
                    if staged is None:
                        group = self._admit(waiting, self._group_size(state, size, free))
                        involved += group
                        looks = 0
                        if self.options.overlap_prefill and isinstance(state, SlotBatch) and len(state):
                            beside = group  # they join at the next look, their slots free until then
                            break
                        staged = self._prefill(group, prefix)
                    if free >= len(staged):
                        joining, staged = staged, None
                    else:
                        joining = staged.take(free)
                    free -= len(joining)
                    if state is None and not self.options.static_cache:
                        state = joining
                    else:
                        if state is None:
                            # Sized for the waiting rows too: ones that joined late fit the slots before.
                            state = SlotBatch(self._slots(size, [*layout, *waiting], prefix))
                            fits = self._fitting(layout, prefix, state.step.cache)  # maybe larger
                        state.merge(joining)
                if beside:
                    prefilled: list[DynamicBatch] = []
                    then = partial(self._prefill_beside, beside, prefix, self._mark(), prefilled.append)
                    yield from finished(self._step(state, outgrown, then))
                    [staged] = prefilled
                else:
                    yield from finished(self._step(state, outgrown))
                looks = looks + 1 if waiting else 0
                if not len(state):
                    state = None
            except torch.OutOfMemoryError as exc:
                state = staged = None
                self._drop_step()  # rebuilt for the smaller batch
                self._release_memory()
                if size == 1:
                    yield from finished(
                        (item, self._failure(item, "synthesis", f"out of memory at batch size 1: {exc}"))
                        for item in involved
                    )
                    continue
                size = max(1, size // 2)
                log.warning(
                    "out of memory with %d rows in flight; retrying them at batch size %d",
                    len(involved),
                    size,
                )
                waiting = self._order([*waiting, *involved])
            except Exception as exc:  # noqa: BLE001 - a row's failure must not take its batch mates down
                state = staged = None
                if len(involved) == 1:
                    log.warning("request %r failed: %s", involved[0].request.id, exc)
                    failure = self._failure(involved[0], "synthesis", f"generation failed: {exc}")
                    yield from finished([(involved[0], failure)])
                    continue
                for item in involved:
                    yield from finished(self._decode_all([item], size=1))

    def _fitting(
        self, rows: list[_Prepared], prefix: _Prefix | None, cache: SlotCache | None = None
    ) -> Callable[[_Prepared], bool]:
        """Whether a row that joins a call late fits its slots: `cache` once built, else slots for `rows`,
        with the call's `prefix`."""
        if not self.options.static_cache:
            return lambda item: True
        if cache is None and not rows:
            return lambda item: False
        length, steps, window = (
            (cache.length, cache.max_steps, cache.window) if cache else self._bounds(rows, prefix)
        )

        def fits(item: _Prepared) -> bool:
            needs = zip(self._bounds([item], prefix), (length, steps, window), strict=True)
            return (prefix is None or prefix.covers(item)) and all(need <= has for need, has in needs)

        return fits

    def _failure(self, item: _Prepared, field_name: str, message: str) -> SynthesisResult:
        return SynthesisResult(
            id=item.request.id, error=message, error_field=field_name, timings=dict(item.timings)
        )

    def _guard(self, rows: int, length: int) -> None:
        """The CPU stand-in for running out of GPU memory: too many (rows x context) frames at once."""
        limit = self.options.max_frames_per_batch
        if limit and rows * length > limit:
            raise torch.OutOfMemoryError(
                f"{rows} rows x {length} tokens exceeds max_frames_per_batch={limit}"
            )

    def _slots(self, size: int, prepared: list[_Prepared], prefix: _Prefix | None = None) -> DecodeStep:
        """The decode step over a SlotCache of `size` slots that fits every row of `prepared` (and holds the
        call's shared `prefix`), kept from call to call while it fits (sizes rounded up by round_up); a cache
        over twice as long as needed is rebuilt: its memory could hold a larger batch."""
        length, max_steps, window = self._bounds(prepared, prefix)
        needed = round_up(prefix.tokens) if prefix else 0
        step = self._decode_step
        if step is None or not step.cache.fits(size, length, max_steps, window, needed):
            self._drop_step()
            self._release_memory()
            step = self._decode_step = self._new_step(size, length, max_steps, window, needed)
        step.cache.reset()
        if prefix:
            step.cache.set_prefix(prefix.cache)
        return step

    def _bounds(self, rows: list[_Prepared], prefix: _Prefix | None) -> tuple[int, int, int]:
        """The columns (less the `prefix` kept once), frames and RAS window slots for `rows` need."""
        length = self._slot_length(rows, prefix.tokens if prefix else 0)
        # A row takes as many steps as its slot's columns allow, up to max_new_tokens (SlotCache.admit).
        max_steps = min(length, round_up(max(p.request.max_new_tokens for p in rows)))
        return length, max_steps, max(self._ras_window(p.request) for p in rows)

    def _new_step(self, size: int, length: int, max_steps: int, window: int, prefix: int) -> DecodeStep:
        cache = SlotCache(
            self.model.config, size, length, self.checkpoint.dtype, self.device, max_steps, window, prefix
        )
        return DecodeStep(
            self.model,
            cache,
            self.options.cuda_graphs,
            self.stream_bos,
            self.stream_eos,
            self.options.ignore_eos,
            self._compile,
            self._capture_lock,
        )

    def _drop_step(self) -> None:
        """Forget the decode step; a new one is built for the next batch, uncompiled if this one's compilation
        failed (on an H200 a failing compile spent 54-90 s before falling back)."""
        if self._decode_step is not None and self._decode_step.compile_failed:
            self._compile = False
        self._decode_step = None

    def _slot_length(self, prepared: list[_Prepared], skip: int = 0) -> int:
        """Columns a slot needs: a row's prompt, less the `skip` prefix tokens the cache holds once, plus the
        steps it reserves."""
        context = max(len(p.input_ids) - skip + p.reserve for p in prepared)
        return min(round_up(context), self.max_context)

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prefill(self, batch: list[_Prepared], prefix: _Prefix | None = None) -> DynamicBatch:
        """Run the prompts of `batch` through the model: the tokens every row shares (system prompt, reference
        voice) once, when they are long enough to be worth it, then each row's own tokens, left-padded. A
        call's `prefix`, already run, stands for the shared tokens."""
        device = self.device
        rows = len(batch)
        shared = prefix.tokens if prefix else self._shared_prefix(batch)
        suffix_len = max(len(p.input_ids) for p in batch) - shared
        input_ids = torch.full((rows, suffix_len), self.pad_id, dtype=torch.long)
        attention = torch.zeros((rows, suffix_len), dtype=torch.long)
        for r, item in enumerate(batch):
            n = len(item.input_ids) - shared
            input_ids[r, suffix_len - n :] = torch.tensor(item.input_ids[shared:])
            attention[r, suffix_len - n :] = 1
        positions = shared + (attention.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids.to(device), "position_ids": positions.to(device)}
        # The audio frames after the shared tokens (context turns after a shared reference), each row's own.
        skip = self._frames_before(batch[0], shared)
        audio = [None if p.audio_codes is None else p.audio_codes[skip:] for p in batch]
        audio_lengths = [0 if a is None else len(a) for a in audio]
        if any(audio_lengths):
            audio_in = torch.full(
                (rows, max(audio_lengths), self.num_codebooks), self.stream_eos, dtype=torch.long
            )
            for r, codes in enumerate(audio):
                if codes is not None:
                    audio_in[r, : audio_lengths[r]] = codes
            mask = torch.arange(audio_in.shape[1])[None, :] < torch.tensor(audio_lengths)[:, None]
            inputs["audio_input_ids"] = audio_in.to(device)
            inputs["audio_input_ids_mask"] = mask.to(device)
        prompt_len = shared + suffix_len
        self._guard(rows, prompt_len)
        params = self._row_params(batch)
        window = int(params.ras_win_len.max().item())
        started = time.perf_counter()
        if prefix is None and shared:
            prefix = self._run_prefix(batch[0], shared)
        cache = prefix.for_rows(rows, self.model.config) if prefix else DynamicCache(config=self.model.config)
        attention = torch.cat([torch.ones((rows, shared), dtype=torch.long), attention], dim=1).to(device)
        out = self.model(
            **inputs, attention_mask=attention, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        logits = out.logits[:, -1, :].view(rows, self.num_codebooks, -1)
        self._sync()
        for item in batch:
            item.timings = {"reference_encode_s": item.encode_s, "prefill_s": time.perf_counter() - started}
            item.timings["decode_s"] = 0.0
        zeros = torch.zeros(rows, dtype=torch.long, device=device)
        return DynamicBatch(
            items=list(batch),
            cache=cache,
            attention=attention,
            positions=inputs["position_ids"][:, -1],
            logits=logits,
            params=params,
            steps=zeros,
            eos_steps=zeros - 1,
            max_steps=torch.tensor([p.request.max_new_tokens for p in batch], device=device),
            history=torch.full((rows, window, self.num_codebooks), -1, dtype=torch.long, device=device),
            frames=torch.zeros((rows, 0, self.num_codebooks), dtype=torch.long, device=device),
        )

    def _mark(self) -> torch.cuda.Event | None:
        """An event after the GPU work queued so far on this thread's stream; None off a GPU."""
        return torch.cuda.current_stream(self.device).record_event() if self._prefill_stream else None

    def _prefill_beside(
        self,
        batch: list[_Prepared],
        prefix: _Prefix | None,
        ready: torch.cuda.Event | None,
        done: Callable[[DynamicBatch], None],
    ) -> None:
        """`batch` prefilled, handed to `done`, while the decode steps queued since `ready` run
        (overlap_prefill): on a GPU on a stream of its own, which waits for the work before those steps (the
        call's prefix, the slots' last merge) but not for them. Its tensors are read on the decoding's stream
        and freed there, which hands their memory back to this stream's pool: the next prefill here waits for
        a later `ready`, so it reuses that memory only after those reads."""
        if self._prefill_stream is None:
            return done(self._prefill(batch, prefix))
        self._prefill_stream.wait_event(ready)
        with torch.cuda.stream(self._prefill_stream):
            staged = self._prefill(batch, prefix)  # returns once the prefill is done (_sync)
        torch.cuda.current_stream(self.device).wait_stream(self._prefill_stream)
        done(staged)

    def _shared_prefix(self, batch: list[_Prepared]) -> int:
        """How many leading prompt tokens every row of `batch` shares, audio included (the frames behind the
        audio placeholders among them must be equal too); 0 when under MIN_SHARED_PREFIX. A dataset voiced
        from a voice library repeats one reference turn, often most of each prompt; an audiobook's chunks
        repeat the narrator's, with their own context turns after it."""
        if len(batch) < 2 or not self.options.share_prefix:
            return 0
        first = batch[0]
        # Each row keeps at least its last token: its logits are the first frame's.
        limit = min(len(p.input_ids) for p in batch) - 1
        shared = 0
        while shared < limit and all(p.input_ids[shared] == first.input_ids[shared] for p in batch[1:]):
            shared += 1
        frames = self._frames_before(first, shared)
        # Placeholders alike, audio maybe not (another voice): shared up to the first frame that differs.
        same = frames
        for item in batch[1:] if frames else []:
            differ = (item.audio_codes[:same] != first.audio_codes[:same]).any(dim=1).nonzero()
            same = int(differ[0]) if len(differ) else same
        if same < frames:
            placeholders = (i for i, token in enumerate(first.input_ids) if token in self._placeholders)
            shared = next(i for n, i in enumerate(placeholders) if n == same)
        return shared if shared >= MIN_SHARED_PREFIX else 0

    @cached_property
    def _placeholders(self) -> frozenset[int]:
        """The prompt tokens that audio frames fill, one frame each."""
        return frozenset((self.model.config.audio_token_id, self.model.config.audio_delay_token_id))

    def _frames_before(self, item: _Prepared, tokens: int) -> int:
        """How many of `item`'s audio frames fill placeholders among its first `tokens` prompt tokens."""
        return sum(1 for token in item.input_ids[:tokens] if token in self._placeholders)

    def _run_prefix(self, item: _Prepared, shared: int) -> _Prefix:
        """`item`'s first `shared` prompt tokens (audio frames among them included) run through the model."""
        cache = DynamicCache(config=self.model.config)
        device = self.device
        inputs = {
            "input_ids": torch.tensor([item.input_ids[:shared]], device=device),
            "position_ids": torch.arange(shared, device=device)[None, :],
        }
        frames = self._frames_before(item, shared)
        audio = item.audio_codes[:frames] if frames else None
        if audio is not None:
            inputs["audio_input_ids"] = audio[None].to(device)
        self.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return _Prefix(shared, cache, item.input_ids[:shared], audio)

    def _step(
        self,
        state: DynamicBatch | SlotBatch,
        outgrown: list[_Prepared],
        then: Callable[[], None] | None = None,
    ):
        """Advance the batch and yield the rows that finished; rows that outgrew their slot go to `outgrown`
        instead, to be generated again with their whole max_new_tokens. `then` (a SlotBatch's only) runs once
        the steps are queued, before the engine looks at them."""
        started = time.perf_counter()
        retired = state.advance(self) if then is None else state.advance(self, then)
        elapsed = time.perf_counter() - started
        for item in [*state.items, *(i for i, _ in retired)]:
            item.timings["decode_s"] += elapsed
        for item, frames in retired:
            if self._outgrew(item, frames):
                item.reserve = item.request.max_new_tokens
                outgrown.append(item)
            else:
                yield item, self._result(item, frames)

    def _outgrew(self, item: _Prepared, frames: torch.Tensor) -> bool:
        """Whether a row stopped short of max_new_tokens with its audio unended (the last frame not stream-eos
        in every codebook): its slot ran out of columns."""
        return len(frames) < item.request.max_new_tokens and not bool((frames[-1] == self.stream_eos).all())

    def _result(self, item: _Prepared, frames: torch.Tensor) -> SynthesisResult:
        result = SynthesisResult(
            id=item.request.id,
            sample_rate=self.sample_rate,
            timings=dict(item.timings),
            prompt_tokens=len(item.input_ids),
        )
        codes, ended = self._strip(frames)
        result.finish_reason = "eos" if ended else "max_new_tokens"
        if codes.shape[1] == 0:
            result.error = f"generated no audio frames within max_new_tokens={item.request.max_new_tokens}"
            result.error_field = "max_new_tokens"
        else:
            result.audio_codes = codes.numpy()
            result.generated_frames = int(codes.shape[1])
        return result

    def _ras_window(self, request: SynthesisRequest) -> int:
        return request.ras_win_len if (self.options.ras_enabled and request.ras_win_len) else 0

    def _row_params(self, batch: list[_Prepared]) -> RowParams:
        rows = []
        for item in batch:
            r = item.request
            ras = self._ras_window(r)
            rows.append(
                {
                    "temperature": r.temperature,
                    "top_k": r.top_k or 0,
                    "top_p": r.top_p if r.top_p is not None else 1.0,
                    "ras_win_len": ras,
                    "ras_max_repeat": r.ras_win_max_num_repeat,
                    "seed": r.seed,
                }
            )
        return RowParams.stack(rows, self.device)

    @cached_property
    def _vocode_margin(self) -> int | None:
        """Frames of overlap each vocoding window needs on either side (model.vocoding), probed once."""
        return margin_for(probe_reach(self.vocode, self.num_codebooks))

    def _vocoding_groups(self, chained: bool) -> VocodingGroups:
        """Where a call's finished rows are vocoded: with `overlap_vocoding` in groups beside the decoding
        (model.vocoding_groups); else in groups as they finish when the call is `chained` (its results come
        out as they are vocoded), or all together after the last row."""
        if not self.options.overlap_vocoding:
            return VocodingGroups(self._vocode_results, self._vocode_budget if chained else None)
        if self._vocode_windows():
            _ = self._vocode_margin  # probed here: the worker thread would probe outside the capture lock
        return VocodingGroups(self._vocode_results, self._vocode_budget, self._vocode_beside)

    def _vocode_beside(self, results: list[SynthesisResult]) -> None:
        """Vocode `results` in the worker thread (see _beside_decoding); out of memory is raised, for the
        caller's thread to vocode them again (see _vocode_results)."""

        def decode(codes: torch.Tensor) -> np.ndarray:
            with self._beside_decoding():
                return self.vocode(codes)

        self._vocode_now(results, self._vocode_budget(), decode)

    def _vocode_windows(self) -> bool:
        windows = self.options.vocode_windows
        return self.device.type == "cuda" if windows is None else windows

    def _vocode_now(
        self, results: list[SynthesisResult], budget: int, decode: Callable[[torch.Tensor], np.ndarray]
    ) -> None:
        margin = self._vocode_margin if self._vocode_windows() else None
        waveforms, seconds = vocode_rows(decode, [r.audio_codes for r in results], margin, budget)
        for result, waveform, spent in zip(results, waveforms, seconds, strict=True):
            result.waveform = waveform
            result.timings["vocode_s"] = spent

    def _vocode_results(self, results: list[SynthesisResult]) -> None:
        """Decode codes to waveforms in calls of about VOCODE_FRAMES_PER_ROW x the slots frames (on a CPU,
        VOCODE_CPU_FRAMES): rows of one length together, or with `vocode_windows` every row cut into windows
        of one size (model.vocoding).
        Either way a row's waveform depends on its batch mates by float rounding at most: equal lengths need no
        padding, and a row's windows are the same whichever rows it is vocoded with. (A codec call on two rows
        and one on each alone differ by ~5e-9 on the tiny checkpoint on a CPU, which can move a 16-bit sample
        by one step: a row retried alone after its actor died may differ from its first try by that.)

        Out of memory: the decode step's slots are freed and the calls halve, down to VOCODE_FRAMES_PER_ROW
        frames; then each row is vocoded alone, and a row that still does not fit becomes an error row."""
        if not results:
            return
        budget = self._vocode_budget()
        while True:
            try:
                self._vocode_now(results, budget, self.vocode)
                return
            except torch.OutOfMemoryError as exc:
                self._drop_step()
                self._release_memory()
                if budget > VOCODE_FRAMES_PER_ROW:
                    budget = max(VOCODE_FRAMES_PER_ROW, budget // 2)
                    log.warning(
                        "out of memory vocoding %d rows; retrying in calls of %d frames", len(results), budget
                    )
                elif len(results) > 1:
                    for result in results:
                        self._vocode_results([result])
                    return
                else:
                    frames = results[0].audio_codes.shape[-1]
                    results[0].error = f"out of memory while vocoding {frames} frames: {exc}"
                    results[0].error_field = "synthesis"
                    return

    def _vocode_budget(self) -> int:
        """Frames one vocoding call takes (see _vocode_results)."""
        if self.device.type != "cuda":
            return VOCODE_CPU_FRAMES
        step = self._decode_step
        slots = step.cache.slots if step is not None else self.options.max_batch_size
        return min(max(1, slots or 16) * VOCODE_FRAMES_PER_ROW, VOCODE_MAX_FRAMES)

    def _strip(self, frames: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(steps, C) delayed frames -> (C, frames) codes without stream bos/eos, and whether the model ended
        the audio (stream-eos in the first codebook) rather than running out of max_new_tokens."""
        if len(frames) < self.num_codebooks:
            return torch.zeros((self.num_codebooks, 0), dtype=torch.long), False
        codes = self.processor.revert_delay_pattern(frames)  # (steps - C + 1, C)
        codes = codes[1:]  # the opening all-bos frame
        ended = bool((codes[:, 0] == self.stream_eos).any())
        if len(codes) and bool((codes[-1] == self.stream_eos).all()):
            codes = codes[:-1]
        return codes.clamp(0, self.stream_bos - 1).transpose(0, 1).contiguous(), ended

    def vocode(self, codes: torch.Tensor) -> np.ndarray:
        """(C, frames) or (B, C, frames) codes -> (samples,) or (B, samples) float32 at 24 kHz."""
        single = codes.dim() == 2
        tokenizer = self.processor.audio_tokenizer
        with torch.inference_mode():
            audio = tokenizer.decode((codes[None] if single else codes).to(self.device)).audio_values
        audio = audio[:, 0].float().cpu().numpy().astype(np.float32)
        return audio[0] if single else audio

    def _sync(self) -> None:
        """Wait for this thread's GPU work (not the codec's beside it, see overlap_vocoding)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
