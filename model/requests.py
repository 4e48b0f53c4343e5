"""The request and result types every job shares."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Upstream Higgs Audio v2 sampling defaults (examples/generation.py); RAS window as in the released
# generation config.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 50
DEFAULT_MAX_NEW_TOKENS = 2048
DEFAULT_RAS_WIN_LEN = 7
DEFAULT_RAS_WIN_MAX_NUM_REPEAT = 2


class RequestError(ValueError):
    """A problem with one request: which field, which value, and why."""

    def __init__(self, field: str, reason: str, value: object = None) -> None:
        self.field = field
        self.reason = reason
        self.value = value
        super().__init__(self.message)

    @property
    def message(self) -> str:
        shown = "" if self.value is None else f" (value {_preview(self.value)})"
        return f"{self.field}{shown}: {self.reason}"


def _preview(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Parameter:
    """A sampling parameter's type, inclusive range and default."""

    kind: type  # int or float
    low: float
    high: float | None  # None: no fixed bound (max_new_tokens: the model's context, or a job's limit)
    default: float
    low_open: bool = False  # low itself excluded


# Every name is also a SynthesisRequest field.
PARAMETERS: dict[str, Parameter] = {
    "temperature": Parameter(float, 0, 2, DEFAULT_TEMPERATURE),
    "top_p": Parameter(float, 0, 1, DEFAULT_TOP_P, low_open=True),
    "top_k": Parameter(int, 0, 1026, DEFAULT_TOP_K),
    "max_new_tokens": Parameter(int, 1, None, DEFAULT_MAX_NEW_TOKENS),
    "ras_win_len": Parameter(int, 0, 64, DEFAULT_RAS_WIN_LEN),
    "ras_win_max_num_repeat": Parameter(int, 1, 64, DEFAULT_RAS_WIN_MAX_NUM_REPEAT),
    "seed": Parameter(int, 0, 2**63 - 1, 0),
}


def parameter_value(
    name: str, value: object, high: float | None = None, *, lenient: bool = False
) -> int | float:
    """`value` checked as the sampling parameter `name` (type and range; `high` overrides the upper bound)
    and returned as its plain Python type. `lenient` is for manifests: it takes integral floats for integer
    parameters (pandas turns an integer column with gaps into floats) and numbers written as text (a CSV
    column with one non-number in it is read as text, every row's number too)."""
    spec = PARAMETERS[name]
    expected = "an integer" if spec.kind is int else "a number"
    if lenient and isinstance(value, str):
        value = _number_in(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise RequestError(name, f"must be {expected}, got {type(value).__name__}", value)
    number: int | float = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(number, float) and math.isnan(number):
        raise RequestError(name, "is NaN", value)
    if spec.kind is int and isinstance(number, float):
        if not (lenient and number.is_integer()):
            raise RequestError(name, f"must be {expected}, got {number!r}", value)
        number = int(number)
    high = spec.high if high is None else high
    if number < spec.low or (high is not None and number > high) or (spec.low_open and number == spec.low):
        interval = f"{'(' if spec.low_open else '['}{spec.low}, {'inf' if high is None else high}]"
        raise RequestError(name, f"must be in {interval}", value)
    return spec.kind(number)


def _number_in(text: str) -> int | float | str:
    """The number `text` spells, or `text` itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_parameters(request: SynthesisRequest) -> None:
    """Refuse a request whose sampling parameters have the wrong type or lie out of range, naming the
    first such field; None turns RAS off."""
    for name in PARAMETERS:
        value = getattr(request, name)
        if not (name == "ras_win_len" and value is None):
            parameter_value(name, value)


# The audio tokenizer's rate: reference clips decoded ahead of the engine are resampled to it.
CODEC_SAMPLE_RATE = 24000


@dataclass(frozen=True)
class DecodedClip:
    """A reference clip decoded ahead of the engine (mono float32 at `sample_rate`), as the dataset job's
    fetch stage hands it on: the synthesis actor then only encodes it. `source_hash` is the content hash of
    the encoded file it came from, so later rows that carry that file hit the engine's cache of codes."""

    samples: np.ndarray
    sample_rate: int
    source_hash: str


@dataclass(frozen=True)
class KnownClip:
    """A reference clip the dataset job's fetch stage has already sent on decoded: later rows with it (a voice
    library's) carry only its content hash, not its file (~0.3-3 MB a row through Ray's object store, 0.3-3 GB
    a 1,024-row block). The synthesis stage fills in `codes` from its engine's cache, or, where its actor
    has not met the clip, reads the row's source again."""

    source_hash: str
    codes: Any = None  # (codebooks, frames), the engine's codes of the clip


@dataclass
class Reference:
    """One voice: a reference clip with its transcript, or a text voice profile.

    `audio` is either encoded bytes (wav, flac, mp3, ogg) or a mono float32 waveform at `sample_rate`;
    `codes` stands in for it where the clip is encoded already (KnownClip).
    """

    audio: bytes | np.ndarray | None = None
    transcript: str = ""
    speaker_tag: str | None = None
    sample_rate: int | None = None
    profile: str | None = None
    # Key of the clip's codes in the engine's cache when not the hash of `audio` (see DecodedClip).
    cache_key: str | None = None
    codes: Any = None  # (codebooks, frames) codes of the clip, from the engine's cache

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.audio, self.profile, self.codes)) != 1:
            # `codes` is set by the synthesis stage only, so a manifest's user meets audio and profile alone.
            given = [name for name in ("audio", "profile", "codes") if getattr(self, name) is not None]
            raise RequestError(
                "references",
                f"a reference needs exactly one of audio or profile, got {' and '.join(given) or 'neither'}",
            )


@dataclass
class ContextTurn:
    """An earlier chunk of the same long-form text and the audio codes generated for it.

    Long-form generation feeds these back as user/assistant turns so the voice carries over (upstream's
    generation_chunk_buffer_size). `codes` is (codebooks, frames) as SynthesisResult.audio_codes.
    """

    text: str
    codes: np.ndarray


@dataclass
class SynthesisRequest:
    text: str
    id: str = ""
    system_prompt: str | None = None
    scene_prompt: str | None = None
    references: list[Reference] = field(default_factory=list)
    # Upstream's --ref_audio_in_system_message: speakers described inside the scene block rather than as
    # user/assistant turns. Forced on when any reference is a profile, as upstream does.
    references_in_scene: bool = False
    # Earlier chunks, oldest first, placed after the reference turns and before `text`.
    context: list[ContextTurn] = field(default_factory=list)
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ras_win_len: int | None = DEFAULT_RAS_WIN_LEN
    ras_win_max_num_repeat: int = DEFAULT_RAS_WIN_MAX_NUM_REPEAT
    seed: int = 0


@dataclass
class SynthesisResult:
    id: str
    waveform: np.ndarray | None = None
    sample_rate: int = 24000
    # (num_codebooks, frames), delay pattern already reverted, stream bos/eos stripped.
    audio_codes: np.ndarray | None = None
    prompt_tokens: int = 0
    generated_frames: int = 0
    # "eos": the model ended the audio; "max_new_tokens": it was cut off there, likely mid-word.
    finish_reason: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_field: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def duration_s(self) -> float:
        return 0.0 if self.waveform is None else len(self.waveform) / self.sample_rate
