"""Specification of reference-clip decoding: formats, channels, rates, rejections and content hashing."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import soundfile as sf
import torchaudio

from model.options import MIN_REFERENCE_SECONDS
from model.reference_audio import SILENCE_PEAK_THRESHOLD, content_hash, decode_reference
from model.requests import RequestError

TARGET = 24000
FIELD = "references[0].audio"


def sine(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(tmp_path, samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, samples, rate, format=fmt, subtype=subtype)
    return path.read_bytes()


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def test_soundfile_here_reads_and_writes_mp3():
    # decode_reference relies on libsndfile's own MPEG decoder rather than an ffmpeg fallback.
    assert "MP3" in sf.available_formats()
    assert "MPEG_LAYER_III" in sf.available_subtypes("MP3")


# (format, subtype, encode rate, allowed duration error in seconds). mp3 may carry encoder padding.
FORMATS = [
    pytest.param("WAV", "PCM_16", 24000, 0.001, id="wav"),
    pytest.param("FLAC", "PCM_16", 24000, 0.001, id="flac"),
    pytest.param("OGG", "VORBIS", 24000, 0.01, id="ogg-vorbis"),
    pytest.param("OGG", "OPUS", 48000, 0.03, id="ogg-opus"),
    pytest.param("MP3", "MPEG_LAYER_III", 24000, 0.1, id="mp3"),
]


@pytest.mark.parametrize(("fmt", "subtype", "rate", "tolerance_s"), FORMATS)
def test_each_format_decodes_to_mono_float32_at_target_rate(tmp_path, fmt, subtype, rate, tolerance_s):
    data = encode(tmp_path, sine(1.5, rate), rate, fmt, subtype)

    out = decode_reference(data, TARGET)

    assert out.dtype == np.float32
    assert out.ndim == 1
    assert abs(len(out) / TARGET - 1.5) <= tolerance_s
    assert dominant_frequency(out, TARGET) == pytest.approx(440.0, abs=2.0)


def test_stereo_44k1_resamples_to_24k_with_expected_sample_count(tmp_path):
    left = sine(2.0, 44100)
    data = encode(tmp_path, np.stack([left, left], axis=1), 44100, "WAV", "PCM_16")

    out = decode_reference(data, TARGET)

    assert out.ndim == 1
    assert abs(len(out) - 2 * TARGET) <= 1


def test_identical_channels_downmix_keeps_their_amplitude(tmp_path):
    left = sine(1.0, 44100, amplitude=0.5)
    data = encode(tmp_path, np.stack([left, left], axis=1), 44100, "WAV", "FLOAT")

    out = decode_reference(data, TARGET)

    # Mean of equal channels is the channel itself: neither doubled (sum) nor halved.
    assert np.max(np.abs(out)) == pytest.approx(0.5, abs=0.01)


def test_downmix_is_the_mean_of_the_channels(tmp_path):
    left = sine(1.0, TARGET, freq=440.0, amplitude=0.5)
    right = sine(1.0, TARGET, freq=660.0, amplitude=0.3)
    data = encode(tmp_path, np.stack([left, right], axis=1), TARGET, "WAV", "FLOAT")

    out = decode_reference(data, TARGET)

    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-6)


def test_opposite_channels_cancel_to_silence_and_are_rejected(tmp_path):
    left = sine(1.0, TARGET)
    data = encode(tmp_path, np.stack([left, -left], axis=1), TARGET, "WAV", "FLOAT")

    with pytest.raises(RequestError, match="silent"):
        decode_reference(data, TARGET, field=FIELD)


def test_16k_wav_is_upsampled_to_24k_keeping_pitch(tmp_path):
    data = encode(tmp_path, sine(0.5, 16000), 16000, "WAV", "PCM_16")

    out = decode_reference(data, TARGET)

    assert abs(len(out) - 12000) <= 1
    assert dominant_frequency(out, TARGET) == pytest.approx(440.0, abs=2.0)


def test_clip_already_at_target_rate_is_returned_unresampled(tmp_path):
    samples = sine(1.0, TARGET)
    data = encode(tmp_path, samples, TARGET, "WAV", "FLOAT")

    np.testing.assert_array_equal(decode_reference(data, TARGET), samples)


def test_bytearray_is_accepted_like_bytes(tmp_path):
    data = encode(tmp_path, sine(1.0, TARGET), TARGET, "WAV", "PCM_16")

    np.testing.assert_array_equal(decode_reference(bytearray(data), TARGET), decode_reference(data, TARGET))


def test_mono_ndarray_with_sample_rate_is_resampled():
    out = decode_reference(sine(1.0, 48000), TARGET, sample_rate=48000)

    assert out.dtype == np.float32
    assert abs(len(out) - TARGET) <= 1
    assert dominant_frequency(out, TARGET) == pytest.approx(440.0, abs=2.0)


def test_frames_by_channels_ndarray_is_downmixed():
    left = sine(1.0, TARGET, amplitude=0.4)
    waveform = np.stack([left, np.zeros_like(left)], axis=1)

    out = decode_reference(waveform, TARGET, sample_rate=TARGET)

    np.testing.assert_allclose(out, left / 2, atol=1e-7)


def test_float64_ndarray_comes_back_as_float32():
    out = decode_reference(sine(1.0, TARGET).astype(np.float64), TARGET, sample_rate=TARGET)

    assert out.dtype == np.float32


def test_int16_ndarray_is_scaled_to_unit_range():
    pcm = (sine(1.0, TARGET, amplitude=0.5) * 32768).astype(np.int16)

    out = decode_reference(pcm, TARGET, sample_rate=TARGET)

    assert np.max(np.abs(out)) == pytest.approx(0.5, abs=1e-3)


def test_returned_waveform_does_not_alias_the_input_array():
    waveform = sine(1.0, TARGET)

    out = decode_reference(waveform, TARGET, sample_rate=TARGET)
    out[:] = 0.0

    assert np.max(np.abs(waveform)) > 0.4


def test_ndarray_without_sample_rate_is_rejected():
    with pytest.raises(RequestError, match="sample_rate") as caught:
        decode_reference(sine(1.0, TARGET), TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_ndarray_with_three_dimensions_is_rejected():
    with pytest.raises(RequestError, match="shape") as caught:
        decode_reference(np.ones((10, 2, 2), np.float32), TARGET, sample_rate=TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_channels_first_ndarray_is_rejected_with_how_to_lay_it_out():
    stereo = np.stack([sine(1.0, TARGET), sine(1.0, TARGET)])  # torchaudio.load's (channels, frames)

    with pytest.raises(RequestError, match=r"more channels than frames; pass \(frames, channels\)") as caught:
        decode_reference(stereo, TARGET, sample_rate=TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_clip_shorter_than_the_minimum_is_rejected_with_its_duration(tmp_path):
    # 100 samples: too short for the codec's encoder to run at all.
    data = encode(tmp_path, np.full(100, 0.25, np.float32), TARGET, "WAV", "PCM_16")

    with pytest.raises(RequestError, match=r"clip is 0.00417 s long; .* at least 0.5 s") as caught:
        decode_reference(data, TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_clip_exactly_at_the_minimum_is_accepted():
    waveform = sine(MIN_REFERENCE_SECONDS, 16000)

    assert len(decode_reference(waveform, TARGET, sample_rate=16000)) == MIN_REFERENCE_SECONDS * TARGET


def test_empty_bytes_are_rejected():
    with pytest.raises(RequestError, match="empty") as caught:
        decode_reference(b"", TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_empty_ndarray_is_rejected():
    with pytest.raises(RequestError, match="empty") as caught:
        decode_reference(np.zeros(0, np.float32), TARGET, sample_rate=TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_garbage_bytes_are_rejected_as_undecodable():
    with pytest.raises(RequestError, match=r"not a decodable audio file \(wav, flac, mp3, ogg\)") as caught:
        decode_reference(b"this is not audio, just text" * 20, TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_silent_clip_is_rejected(tmp_path):
    data = encode(tmp_path, np.zeros(TARGET, np.float32), TARGET, "WAV", "PCM_16")

    with pytest.raises(RequestError, match="silent") as caught:
        decode_reference(data, TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_clip_just_above_silence_threshold_is_accepted():
    waveform = sine(1.0, TARGET, amplitude=SILENCE_PEAK_THRESHOLD * 2)

    assert len(decode_reference(waveform, TARGET, sample_rate=TARGET)) == TARGET


def test_clip_just_below_silence_threshold_is_rejected():
    waveform = sine(1.0, TARGET, amplitude=SILENCE_PEAK_THRESHOLD / 2)

    with pytest.raises(RequestError, match="silent"):
        decode_reference(waveform, TARGET, sample_rate=TARGET)


def test_over_long_clip_is_rejected_with_its_duration_and_the_limit(tmp_path):
    data = encode(tmp_path, sine(61.0, 8000), 8000, "WAV", "PCM_16")

    with pytest.raises(RequestError, match=r"61\.0 s.*at most 60 s") as caught:
        decode_reference(data, TARGET, max_seconds=60.0, field=FIELD)
    assert caught.value.field == FIELD


def test_clip_exactly_at_the_limit_is_accepted(tmp_path):
    data = encode(tmp_path, sine(2.0, 8000), 8000, "WAV", "PCM_16")

    assert abs(len(decode_reference(data, TARGET, max_seconds=2.0)) - 2 * TARGET) <= 1


def test_over_long_clip_is_refused_from_the_header_before_decoding_or_resampling(tmp_path, monkeypatch):
    data = encode(tmp_path, sine(600.0, 8000), 8000, "WAV", "PCM_16")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a clip over the limit should be refused before this is called")

    monkeypatch.setattr(sf.SoundFile, "read", must_not_run)
    monkeypatch.setattr(torchaudio.functional, "resample", must_not_run)

    with pytest.raises(RequestError, match=r"600\.0 s"):
        decode_reference(data, TARGET, max_seconds=60.0)


def test_over_long_ndarray_is_rejected():
    with pytest.raises(RequestError, match=r"61\.0 s.*at most 60 s") as caught:
        decode_reference(sine(61.0, 8000), TARGET, sample_rate=8000, field=FIELD)
    assert caught.value.field == FIELD


def test_nan_waveform_is_rejected():
    waveform = sine(1.0, TARGET)
    waveform[100] = np.nan

    with pytest.raises(RequestError, match="NaN or infinite") as caught:
        decode_reference(waveform, TARGET, sample_rate=TARGET, field=FIELD)
    assert caught.value.field == FIELD


def test_infinite_sample_in_encoded_float_wav_is_rejected(tmp_path):
    waveform = sine(1.0, TARGET)
    waveform[5] = np.inf
    data = encode(tmp_path, waveform, TARGET, "WAV", "FLOAT")

    with pytest.raises(RequestError, match="NaN or infinite"):
        decode_reference(data, TARGET)


def test_content_hash_of_bytes_is_their_sha256(tmp_path):
    data = encode(tmp_path, sine(1.0, TARGET), TARGET, "WAV", "PCM_16")

    assert content_hash(data) == hashlib.sha256(data).hexdigest()
    assert content_hash(data) == content_hash(bytes(data))


def test_content_hash_differs_for_different_bytes(tmp_path):
    first = encode(tmp_path, sine(1.0, TARGET, freq=440.0), TARGET, "WAV", "PCM_16")
    second = encode(tmp_path, sine(1.0, TARGET, freq=441.0), TARGET, "WAV", "PCM_16")

    assert content_hash(first) != content_hash(second)


def test_content_hash_of_waveform_is_stable():
    assert content_hash(sine(1.0, TARGET), TARGET) == content_hash(sine(1.0, TARGET), TARGET)


def test_content_hash_differs_for_same_samples_at_another_rate():
    waveform = sine(1.0, TARGET)

    assert content_hash(waveform, 24000) != content_hash(waveform, 16000)


def test_content_hash_of_waveform_needs_sample_rate():
    with pytest.raises(RequestError, match="sample_rate"):
        content_hash(sine(1.0, TARGET))


def test_content_hash_refuses_audio_that_is_neither_bytes_nor_an_array():
    with pytest.raises(RequestError, match="expected encoded audio bytes or a numpy waveform, got list"):
        content_hash([0.1, 0.2], TARGET)


def test_content_hash_of_waveform_ignores_memory_layout():
    waveform = np.stack([sine(1.0, TARGET), sine(1.0, TARGET, freq=660.0)], axis=1)

    assert content_hash(waveform, TARGET) == content_hash(np.asfortranarray(waveform), TARGET)


def test_content_hash_distinguishes_channel_layout():
    # Same bytes read as 2 or as 4 channels are different clips.
    samples = sine(1.0, TARGET)

    assert content_hash(samples.reshape(-1, 2), TARGET) != content_hash(samples.reshape(-1, 4), TARGET)
