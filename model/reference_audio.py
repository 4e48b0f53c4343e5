"""Reference clips: decode, validate and resample them to the audio tokenizer's rate.

Encoded bytes (wav, flac, ogg vorbis/opus, mp3) are all read through `soundfile`: its bundled
libsndfile (>= 1.1) decodes MPEG layer III itself, so no ffmpeg subprocess is needed.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import soundfile as sf
import torch
import torchaudio

from model.options import MIN_REFERENCE_SECONDS
from model.requests import RequestError

# -80 dBFS: below this a clip carries no voice to clone, only dither or digital silence, and the
# tokenizer would encode nothing useful from it.
SILENCE_PEAK_THRESHOLD = 1e-4

DEFAULT_MAX_SECONDS = 60.0

_UNDECODABLE = "not a decodable audio file (wav, flac, mp3, ogg)"
_FIELD = "references.audio"


def decode_reference(
    data: bytes | np.ndarray,
    target_sample_rate: int,
    *,
    sample_rate: int | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    field: str = _FIELD,
) -> np.ndarray:
    """Return `data` as a mono float32 1-D waveform at `target_sample_rate`.

    `data` is either an encoded file's bytes or a waveform (1-D, or frames x channels) at `sample_rate`.
    Raises RequestError(field, ...) for empty, undecodable, non-finite, silent, too short or over-long clips.
    """
    if _is_waveform(data, field):
        frames, rate = _from_array(data, _rate(sample_rate, field), max_seconds, field)
    else:
        frames, rate = _from_bytes(bytes(data), max_seconds, field)

    if len(frames) < MIN_REFERENCE_SECONDS * rate:
        raise RequestError(
            field,
            f"clip is {len(frames) / rate:.3g} s long; reference clips must be at least {MIN_REFERENCE_SECONDS:g} s",
        )
    if not np.isfinite(frames).all():
        raise RequestError(field, "waveform contains NaN or infinite samples")

    # Mean rather than sum so a clip recorded identically on both channels keeps its level.
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]

    # Judged after the downmix: that is the signal the tokenizer will actually see.
    peak = float(np.max(np.abs(mono)))
    if peak < SILENCE_PEAK_THRESHOLD:
        raise RequestError(
            field,
            f"clip is silent (peak amplitude {peak:.2g}, below {SILENCE_PEAK_THRESHOLD:g}, i.e. -80 dBFS)",
        )

    if rate != target_sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, target_sample_rate).numpy()
    # A copy, so the caller's array and the returned waveform never alias each other.
    return np.array(mono, dtype=np.float32, copy=True)


def content_hash(data: bytes | np.ndarray, sample_rate: int | None = None) -> str:
    """sha256 hex digest identifying a reference clip, used as the key for its cached audio codes.

    Bytes hash as given. A waveform hashes its samples together with dtype, shape and sample rate, since
    the same samples at another rate (or laid out as other channels) are a different clip.
    """
    digest = hashlib.sha256()
    if _is_waveform(data, _FIELD):
        array = np.ascontiguousarray(data)
        digest.update(f"waveform:{array.dtype.str}:{array.shape}:{_rate(sample_rate, _FIELD)}:".encode())
        digest.update(array.tobytes())
    else:
        digest.update(data)
    return digest.hexdigest()


def _is_waveform(data: object, field: str) -> bool:
    """Whether `data` is a waveform rather than an encoded file's bytes; anything else is refused."""
    if isinstance(data, np.ndarray):
        return True
    if isinstance(data, (bytes, bytearray, memoryview)):
        return False
    raise RequestError(field, f"expected encoded audio bytes or a numpy waveform, got {type(data).__name__}")


def _rate(sample_rate: object, field: str) -> int:
    """A waveform's sample rate, checked."""
    if sample_rate is None:
        raise RequestError(field, "a waveform needs its sample_rate")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise RequestError(field, "sample_rate must be a positive integer", sample_rate)
    return int(sample_rate)


def _from_bytes(data: bytes, max_seconds: float, field: str) -> tuple[np.ndarray, int]:
    if not data:
        raise RequestError(field, "audio is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as handle:
            rate = handle.samplerate
            declared = handle.frames
            limit = _max_frames(max_seconds, rate)
            # The header's frame count lets a 10-minute clip be refused before any of it is decoded.
            if declared > limit:
                raise _too_long(field, declared / rate, max_seconds)
            # Headers can understate (streamed wav, some mp3s), so never decode more than one frame
            # past the limit whatever the header said.
            frames = handle.read(limit + 1, dtype="float32", always_2d=True)
    except sf.SoundFileError as error:
        raise RequestError(field, _UNDECODABLE) from error
    if len(frames) > limit:
        raise _too_long(field, None, max_seconds)
    if len(frames) == 0:
        raise RequestError(field, "audio decodes to 0 samples")
    return frames, rate


def _from_array(data: np.ndarray, rate: int, max_seconds: float, field: str) -> tuple[np.ndarray, int]:
    if data.ndim not in (1, 2):
        raise RequestError(field, f"waveform must be 1-D or (frames, channels), got shape {data.shape}")
    if data.ndim == 2 and data.shape[1] > data.shape[0]:
        raise RequestError(
            field,
            f"waveform of shape {data.shape} has more channels than frames; pass (frames, channels), "
            "e.g. torchaudio.load's (channels, frames) transposed",
        )
    frames = data[:, None] if data.ndim == 1 else data
    if frames.size == 0:
        raise RequestError(field, "waveform is empty (0 samples)")
    if len(frames) > _max_frames(max_seconds, rate):
        raise _too_long(field, len(frames) / rate, max_seconds)

    if np.issubdtype(frames.dtype, np.signedinteger):
        # Integer PCM: scale to [-1, 1) the way soundfile does for decoded files.
        frames = frames.astype(np.float32) / float(-np.iinfo(frames.dtype).min)
    elif np.issubdtype(frames.dtype, np.floating):
        frames = frames.astype(np.float32, copy=False)
    else:
        raise RequestError(field, f"waveform must hold real numbers, got dtype {frames.dtype}")
    return frames, rate


def _max_frames(max_seconds: float, rate: int) -> int:
    return int(max_seconds * rate)


def _too_long(field: str, seconds: float | None, max_seconds: float) -> RequestError:
    length = "longer than the limit" if seconds is None else f"{seconds:.1f} s long"
    return RequestError(field, f"clip is {length}; reference clips may be at most {max_seconds:g} s")
