"""What a run asks of the model side, as plain data: which checkpoint, and how the engine batches.

Kept free of torch so the Ray driver and the Hydra jobs can build them without loading torch; only the
synthesis actors, which load the model, import model.checkpoint and model.engine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# The transformers-format release: generation model with its processor, and the audio tokenizer.
DEFAULT_MODEL_ID = "eustlb/higgs-audio-v2-generation-3B-base"
DEFAULT_AUDIO_TOKENIZER_ID = "eustlb/higgs-audio-v2-tokenizer"
AUDIO_TOKENIZER_SUBFOLDER = "audio_tokenizer"
# Reference clips must be at least this long: shorter ones carry too little voice to clone, and under 119
# samples the codec's encoder cannot run at all (its convolutions outgrow the input).
MIN_REFERENCE_SECONDS = 0.5
DEFAULT_CACHE_DIR = Path(os.environ.get("HIGGS_BATCH_CACHE", Path.home() / ".cache" / "higgs-batch"))


def is_remote_uri(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
_DEVICE = re.compile(r"(cpu|mps|(cuda|xpu)(:\d+)?)")


@dataclass(frozen=True)
class CheckpointSpec:
    source: str = DEFAULT_MODEL_ID
    # None: the folder's own audio_tokenizer/ if present, else what processor_config.json names.
    audio_tokenizer: str | None = None
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: bfloat16 on GPU, float32 on CPU
    attn_implementation: str | None = None  # None: transformers' default (sdpa)
    cache_dir: str | None = None
    storage_options: dict | None = None

    def __post_init__(self) -> None:
        # Checked where the run is configured: an actor would only find out after Ray and its workers start.
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {', '.join(FLOAT_DTYPES)} (or null)")
        if self.device is not None and not _DEVICE.fullmatch(self.device):
            raise ValueError(
                f"model.device={self.device!r}: use cpu, cuda, cuda:N, mps, or null for cuda if present"
            )


@dataclass
class EngineOptions:
    # 0 picks the largest batch that fits in free GPU memory (see engine.fitting_batch_size); 16 on CPU.
    max_batch_size: int = 16
    reference_cache_size: int = 256
    max_reference_seconds: float = 60.0
    ras_enabled: bool = True
    # Benchmarks generate a fixed number of frames: stream-eos is never chosen, rows run to max_new_tokens.
    ignore_eos: bool = False
    # Waiting rows join a running batch as others finish (continuous batching); off = static batches.
    refill: bool = True
    # Decode from a fixed-shape KV cache with one slot per row (model.slot_cache); off = transformers'
    # DynamicCache, the plain path the fast one is tested against.
    static_cache: bool = True
    # On a GPU, replay each decode step from a captured CUDA graph (needs static_cache).
    cuda_graphs: bool = True
    # torch.compile the decode step (needs static_cache; a C++ compiler on CPU, Triton on GPU): fewer, fused
    # kernels per step, after a one-off compilation of about a minute per actor.
    compile: bool = False
    # Rows of a prefill group that share their leading prompt tokens and audio (one reference voice) run
    # those tokens through the model once; off = every row prefills its whole prompt.
    share_prefix: bool = True
    # When every row of a call shares that prefix, keep its keys and values once beside the KV slots, which
    # then hold only each row's own tokens: a decode step reads the prefix once, not once per row, and a row
    # takes less memory, so more rows fit. From engine.MIN_PREFIX_CACHE_ROWS rows decoding together, where
    # it makes the slots shorter (model.attention.prefix_attention replaces sdpa there; on an H100 it wins
    # from ~128 rows).
    shared_prefix_cache: bool = True
    # RMSNorm as torch's fused kernel (model.rms_norm): ~450 fewer kernels per decode step on a GPU, the same
    # numbers on a CPU. Set on the model object at each generate call (engines may share one model).
    fused_norms: bool = True
    # Each layer's query/key/value projections as one matrix product and each MLP's gate/up as another
    # (model.fused_projections): fewer, larger kernels, which is what bounds a step at batch 1 on a GPU. The
    # weights become views into the fused ones on first use (no extra memory). 1.11x at one row on an H100
    # (GPU run 7), not measured at large batches, where a step's time is attention's: off by default.
    fused_projections: bool = False
    # The decoder's projections with int8 weights, a scale per output channel (model.int8_weights): half the
    # bytes a decode step reads at one row, where reading the weights bounds the step. Only with `compile`
    # and one row a batch, where the step converts the weights inside its matrix-vector products (on a GPU
    # model.int8_matvec's Triton kernel); anywhere else every step would first make a dequantized copy of
    # them. Prefill keeps the original weights. Codes drift from the bf16 model's; +50 % weight memory. GPU
    # run 9 (H200): 12.4x real time for one request with inductor's reductions over int8 in place of that
    # kernel, 7.7x for the default step. With fused_projections a layer's seven int8 products are four
    # kernels (their int8 weights stacked too).
    int8_weights: bool = False
    # Vocode rows in overlapping windows of one size, batched across rows (model.vocoding), instead of one
    # codec call per distinct row length. None: on a GPU only. There the windows won 2.74x on an H100 (512
    # rows of 200 lengths); on a CPU the codec is compute-bound and the windows' overlap only adds work
    # (bench_vocoding.py: 0.3-0.6x for the release's codec).
    vocode_windows: bool | None = None
    # Vocode a call's finished rows in groups while the others decode (model.vocoding_groups): in a worker
    # thread, on a GPU on a CUDA stream of its own, so the codec's kernels run beside the decode steps and in
    # their gaps instead of all after the last row, where they took 19 % of a 1,024-row call on an H100 (GPU
    # run 7). Off: every row is vocoded after the call decodes. The waveforms are the same either way. On
    # the CPU (tiny checkpoint, bench_gpu.py) 1.3x for 192 rows through 16 slots, no measurable change for 64
    # through 8. On an H100 (GPU run 8, 1,024 rows through 256 slots) 371.8x real time against 374.3x after
    # the decoding, one run each: no gain there, as a step beside the codec slowed from 17.3 to 23.5 ms, but
    # the fastest combination measured (401.8x, each row reading its own columns) had it on, so on it stays.
    overlap_vocoding: bool = True
    # Refill rows prefill while the running rows decode: the engine queues their next steps, then the
    # prefill (on a GPU on a CUDA stream of its own), and the rows join at the look after. Off: the running
    # rows wait for each refill's prefill, which took 18 % of a 1,024-row call on an H100 (GPU run 7: 28
    # forwards, 6.5 of 35.7 s), while the prefill's matrix products leave the memory bandwidth a decode step
    # needs mostly unused. Its rows' slots stay free for one look longer. The codes are the same either way;
    # on a CPU it only delays the joins. On an H100 (GPU run 8) 0.94x: 379.0x real time against 401.8x
    # without, the 28 prefills taking 2.8 s beside the steps against 1.7 s alone, and 15 more steps.
    overlap_prefill: bool = False
    # Rows that prefill in one forward at most. Their prompts' keys and values are held twice while they are
    # copied into the slots, so fewer leave that memory to slots (engine.fitting_batch_size): on an 80 GB
    # H100, ~250 slots of 1,280 tokens fit instead of 188. Prefill is compute-bound long before: 64 rows of
    # ~330 own tokens each are ~21,000 tokens a forward.
    max_prefill_rows: int = 64
    # How many frames of KV a row's slot holds for its audio: "estimate" (from its text's length, generously:
    # model.speech_length), "max_new_tokens", or a count. A row that outgrows its slot before stream-eos runs
    # again from the start with its whole max_new_tokens (same codes). Slots sized for max_new_tokens (2,048
    # frames, 82 s, by default) hold several times what a sentence needs, and fewer of them fit the GPU.
    reserve: str | int = "estimate"
    # A prefill group only takes prompts within this fraction of its longest one, to bound left padding.
    max_padding_waste: float = 0.15
    # rows x context tokens above which a forward raises OutOfMemoryError; 0 = off. Simulates a full GPU
    # on CPU so the split-and-retry path can be tested.
    max_frames_per_batch: int = 0

    def __post_init__(self) -> None:
        # Checked where the run is configured, before any actor loads the model.
        if self.int8_weights and not (self.compile and self.static_cache and self.max_batch_size == 1):
            raise ValueError(
                "generation.engine.int8_weights=true is for one request at a time: it needs "
                "generation.engine.compile=true, static_cache=true and runtime.batch_size=1 (at larger batches "
                "every decode step would copy the weights back to bf16: slower than leaving it off)"
            )
