"""MP3/M4B export through the real ffmpeg, checked by reading the files back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.export import FFmpegError, build_m4b, decode, encode_mp3, ffmpeg_exe, probe
from pipeline.mastering import Pauses, master_chapter, measure_qc

SR = 24000


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Enveloped harmonic bursts separated by short and sentence-length pauses, at 24 kHz."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    while sum(p.size for p in parts) < seconds * SR:
        n = int(rng.uniform(0.08, 0.25) * SR)
        phase = 2 * np.pi * np.cumsum(rng.uniform(90, 220) * np.linspace(1.0, 1.1, n)) / SR
        burst = sum(np.sin(k * phase) / k for k in range(1, 12)) + 0.3 * rng.standard_normal(n)
        parts.append(burst * np.hanning(n) * rng.uniform(0.3, 1.0))
        parts.append(np.zeros(int((0.35 if rng.random() < 0.1 else rng.uniform(0.02, 0.09)) * SR)))
    x = np.concatenate(parts)
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


@pytest.fixture(scope="module")
def chapters() -> list[np.ndarray]:
    return [master_chapter(speech_like(s, seed=i), SR, Pauses()) for i, s in enumerate([3.0, 1.5, 2.2])]


@pytest.fixture(scope="module")
def mp3s(chapters: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("mp3")
    return [
        encode_mp3(a, 44100, root / f"ch{i + 1:02d}.mp3", tags={"title": f"Chapter {i + 1}", "track": i + 1})
        for i, a in enumerate(chapters)
    ]


def _cover(tmp_path: Path, ext: str) -> bytes:
    path = tmp_path / f"cover.{ext}"
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-f", "lavfi", "-i", "color=c=navy:s=64x64", "-frames:v", "1", str(path)],
        check=True,
        capture_output=True,
    )
    return path.read_bytes()


def test_mp3_is_cbr_192_at_44k1_and_still_passes_acx(chapters: list[np.ndarray], tmp_path: Path) -> None:
    audio = chapters[0]
    tags = {"title": "Chapter 1", "artist": "Jane Doe", "album": "A Book; Vol = 1", "track": "1/3"}
    out = encode_mp3(audio, 44100, tmp_path / "ch01.mp3", tags=tags)

    info = probe(out)
    assert (info["codec"], info["sample_rate"], info["channels"]) == ("mp3", 44100, 1)
    assert info["audio_bit_rate_kbps"] == 192
    assert 190 <= info["bit_rate_kbps"] <= 196  # whole-file rate includes the ID3 tag
    assert info["duration_s"] == pytest.approx(audio.size / 44100, abs=0.05)
    assert {k: info["tags"][k] for k in tags} == tags
    assert info["chapters"] == [] and not info["has_cover"]
    # LAME writes an "Info" header for CBR and "Xing" for VBR (ACX rejects VBR).
    head = out.read_bytes()[:4096]
    assert b"Info" in head and b"Xing" not in head

    decoded, rate = decode(out)
    assert rate == 44100
    assert decoded.size == pytest.approx(audio.size, abs=0.01 * 44100)  # gapless trim: delay removed
    qc = measure_qc(decoded, rate)
    assert qc.passed, qc
    assert qc.rms_db == pytest.approx(measure_qc(audio, 44100).rms_db, abs=0.5)


def test_mp3_peak_guard_pulls_codec_overshoot_back_under_acx(tmp_path: Path) -> None:
    # Limited right at -3 dBFS, MP3 quantisation noise pushes decoded peaks over the ACX limit.
    hot = master_chapter(speech_like(3.0, seed=0), SR, Pauses(), peak_ceiling_db=-3.0)
    raw, rate = decode(encode_mp3(hot, 44100, tmp_path / "raw.mp3", max_peak_db=None))
    assert measure_qc(raw, rate).peak_db > -3.0

    guarded, rate = decode(encode_mp3(hot, 44100, tmp_path / "guarded.mp3"))
    qc = measure_qc(guarded, rate)
    assert qc.peak_db <= -3.0 and qc.passed, qc
    assert qc.rms_db >= measure_qc(hot, 44100).rms_db - 1.0  # a fraction of a dB, not a re-master


def test_mp3_resamples_any_input_rate_to_44k1(tmp_path: Path) -> None:
    raw = speech_like(1.0, seed=4)
    out = encode_mp3(raw, SR, tmp_path / "raw.mp3")
    decoded, rate = decode(out)
    assert probe(out)["sample_rate"] == rate == 44100
    assert decoded.size == pytest.approx(raw.size * 44100 / SR, abs=0.01 * 44100)


@pytest.mark.parametrize("cover_ext", [None, "jpg", "png"])
def test_m4b_has_chapters_tags_and_cover(mp3s: list[Path], tmp_path: Path, cover_ext: str | None) -> None:
    titles = ["Opening", "Chapter 2; The = Sign #2", "Épilogue"]
    cover = _cover(tmp_path, cover_ext) if cover_ext else None
    mime = {"jpg": "image/jpeg", "png": "image/png"}.get(cover_ext or "")
    out = build_m4b(mp3s, titles, tmp_path / "book.m4b", "My Book", "Jane Doe", cover=cover, cover_mime=mime)
    assert out.suffix == ".m4b" and out.is_file()

    durations = [decode(p)[0].size / 44100 for p in mp3s]
    info = probe(out)
    assert (info["codec"], info["sample_rate"], info["channels"]) == ("aac", 44100, 1)
    assert info["duration_s"] == pytest.approx(sum(durations), abs=0.1)
    assert info["tags"]["title"] == "My Book" and info["tags"]["artist"] == "Jane Doe"
    assert info["tags"]["album"] == "My Book"
    assert [c["title"] for c in info["chapters"]] == titles
    starts = np.cumsum([0.0, *durations])
    for chapter, start, end in zip(info["chapters"], starts[:-1], starts[1:], strict=True):
        assert chapter["start_s"] == pytest.approx(start, abs=0.05)
        assert chapter["end_s"] == pytest.approx(end, abs=0.05)

    report = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True
    ).stderr
    assert info["has_cover"] is (cover is not None)
    assert ("attached pic" in report) is (cover is not None)
    assert ("Video: mjpeg" in report) is (cover_ext == "jpg")
    assert ("Video: png" in report) is (cover_ext == "png")


def test_ffmpeg_failures_carry_its_stderr(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"definitely not audio" * 50)
    with pytest.raises(FFmpegError, match=r"ffmpeg failed to decode .*junk\.mp3[\s\S]*(Invalid|Error|error)"):
        build_m4b([junk], ["x"], tmp_path / "book.m4b", "T", "A")
    assert not (tmp_path / "book.m4b").exists()
    with pytest.raises(ValueError, match="one title per chapter"):
        build_m4b([junk], [], tmp_path / "book.m4b", "T", "A")
