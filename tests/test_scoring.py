from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.scoring import (
    Scorer,
    aggregate,
    build_tiny_scoring_models,
    cosine_similarity,
    language_code,
    normalize_for_wer,
    wer,
)


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("Hello, World!", "en", "hello world"),
        ("  Don't   stop -- now.  ", "en", "don't stop now"),
        ("It’s fine", "en", "it's fine"),
        ("well-known", "en", "wellknown"),  # deleted, not spaced, as Seed-TTS does
        ("你好，世界！", "zh", "你 好 世 界"),
        ("你好 世界。", "Chinese", "你 好 世 界"),
        ("（你好）", "zh", "你 好"),
    ],
)
def test_normalize_for_wer(text: str, language: str, expected: str) -> None:
    assert normalize_for_wer(text, language) == expected


@pytest.mark.parametrize(
    ("ref", "hyp", "language", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on mat", "en", 1 / 6),
        ("Hello, World!", "hello world", "en", 0.0),
        ("don't", "dont", "en", 1.0),
        ("the cat", "the cat sat down", "en", 1.0),  # two insertions over two words
        ("a b c", "", "en", 1.0),
        ("你好世界", "你好世届", "zh", 0.25),
        ("你好，世界", "你 好 世 界", "zh", 0.0),
    ],
)
def test_wer(ref: str, hyp: str, language: str, expected: float) -> None:
    assert wer(ref, hyp, language) == pytest.approx(expected)


def test_wer_empty_reference() -> None:
    with pytest.raises(ValueError, match="empty"):
        wer("...", "anything")


def test_language_code() -> None:
    assert [language_code(x) for x in (None, "en", "English", "EN-us", "zh_CN", "Mandarin")] == [
        *("en", "en", "en", "en", "zh", "zh")
    ]


def test_cosine_similarity() -> None:
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 2.0, 2.0]), np.array([1.0, 2.0, 2.0])) == pytest.approx(1.0)
    assert cosine_similarity(np.array([1, 2, 2]), np.array([2, 1, 2])) == pytest.approx(8 / 9)
    assert cosine_similarity(np.array([1.0, 1.0]), np.array([-2.0, -2.0])) == pytest.approx(-1.0)
    for a, b in [([0.0, 0.0], [1.0, 1.0]), ([1.0], [1.0, 2.0]), ([np.nan, 1.0], [1.0, 1.0])]:
        with pytest.raises(ValueError):
            cosine_similarity(np.array(a), np.array(b))


def test_aggregate_by_category() -> None:
    scored = [
        {"category": "A", "wer": 0.0, "sim": 0.5},
        {"category": "A", "wer": 0.5, "sim": None},
        {"category": "B", "wer": 1.0, "sim": 0.7},
        {"category": "B", "wer": None, "sim": None, "error": "audio is missing"},
    ]
    out = aggregate(scored)
    assert out["count"] == 4 and out["errors"] == 1
    assert out["wer"] == pytest.approx(0.5) and out["wer_count"] == 3
    assert out["sim"] == pytest.approx(0.6) and out["sim_count"] == 2
    assert out["groups"]["A"] == {
        "count": 2, "wer": pytest.approx(0.25), "sim": pytest.approx(0.5), "wer_count": 2, "sim_count": 1, "errors": 0
    }  # fmt: skip
    assert out["groups"]["B"]["wer"] == pytest.approx(1.0) and out["groups"]["B"]["errors"] == 1
    assert "groups" not in aggregate(scored, by=None)
    assert "groups" not in aggregate([{"wer": 0.1, "sim": 0.2}])
    assert aggregate([])["wer"] is None


# --- the models, tiny and random --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    whisper, wavlm = build_tiny_scoring_models(tmp_path_factory.mktemp("scoring-models"))
    return Scorer(asr_model=whisper, sv_model=wavlm, device="cpu", batch_size=2)


def _wav_bytes(waveform: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, waveform, rate, format="WAV")
    return buf.getvalue()


def test_build_tiny_models_layout(tmp_path: Path) -> None:
    whisper, wavlm = build_tiny_scoring_models(tmp_path)
    assert Path(whisper) == tmp_path / "whisper" and Path(wavlm) == tmp_path / "wavlm"
    assert (Path(whisper) / "generation_config.json").is_file()
    assert (Path(wavlm) / "preprocessor_config.json").is_file()


def test_transcribe_and_embed(scorer: Scorer) -> None:
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, 24000).astype(np.float32) for _ in range(3)] + [np.zeros(0, np.float32)]
    texts = scorer.transcribe(waves, 24000, "en")
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts) and texts[3] == ""
    assert scorer.transcribe(waves[:1], 24000, "zh")[0] is not None
    assert scorer.transcribe(waves[:1], 24000, "fr")  # no <|fr|> token in the tiny model: detected instead
    emb = scorer.embed(waves[:3], 24000)
    assert emb.shape == (3, scorer.sv.config.xvector_output_dim) and np.isfinite(emb).all()


def test_score_end_to_end(scorer: Scorer) -> None:
    rng = np.random.default_rng(1)
    out_a = rng.normal(0, 0.1, 16000).astype(np.float32)
    out_b = rng.normal(0, 0.1, 36000).astype(np.float32)
    prompt = rng.normal(0, 0.1, 20000).astype(np.float32)
    rows = [
        {"id": "0", "text": "Hello there.", "audio": out_a, "sample_rate": 16000, "category": "A",
         "reference_audio": _wav_bytes(prompt, 24000)},
        {"id": "1", "text": "你好世界", "language": "zh", "audio": _wav_bytes(out_b, 24000), "category": "B",
         "reference_audio": prompt, "reference_sample_rate": 24000},
        {"id": "2", "text": "No reference.", "audio": out_a, "sample_rate": 16000, "category": "A"},
        {"id": "3", "text": "Missing audio.", "category": "B"},
        {"id": "4", "text": "Bad bytes.", "audio": b"not a wav", "category": "B"},
        {"id": "5", "text": "No rate.", "audio": out_a, "category": "B"},
    ]  # fmt: skip
    scored = scorer.score(rows)
    assert [s["id"] for s in scored] == ["0", "1", "2", "3", "4", "5"]
    for s in scored[:3]:
        assert s["error"] is None, s
        assert isinstance(s["wer"], float) and math.isfinite(s["wer"]) and s["wer"] >= 0
        assert isinstance(s["hypothesis"], str) and s["asr_truncated"] is False
    for s in scored[:2]:
        assert -1.0 <= s["sim"] <= 1.0
    assert scored[2]["sim"] is None
    assert scored[1]["language"] == "zh" and scored[1]["duration_s"] == pytest.approx(1.5)
    assert scored[3]["error"] == "audio is missing" and scored[3]["wer"] is None
    assert scored[4]["error"] and scored[4]["wer"] is None
    assert scored[5]["error"] == "audio is a waveform without a sample rate"

    summary = scorer.aggregate(scored)
    assert summary["count"] == 6 and summary["wer_count"] == 3 and summary["sim_count"] == 2
    assert summary["errors"] == 3 and set(summary["groups"]) == {"A", "B"}
    assert math.isfinite(summary["wer"]) and -1.0 <= summary["sim"] <= 1.0


def test_score_flags_audio_past_whisper_window(scorer: Scorer) -> None:
    long = np.full(16000 * 31, 0.01, dtype=np.float32)
    [s] = scorer.score([{"id": "x", "text": "long", "audio": long, "sample_rate": 16000}])
    assert s["asr_truncated"] is True and s["duration_s"] == pytest.approx(31.0)


def test_transcribe_forces_language_and_task(scorer: Scorer, monkeypatch) -> None:
    seen: list[dict] = []
    generate = scorer.asr.generate

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("language", "task")})
        return generate(*args, **kwargs)

    monkeypatch.setattr(scorer.asr, "generate", spy)
    wave = np.random.default_rng(2).normal(0, 0.1, 8000).astype(np.float32)
    for language in ("English", "zh", "fr", None):
        scorer.transcribe([wave], 16000, language)
    assert seen == [
        {"language": "en", "task": "transcribe"},
        {"language": "zh", "task": "transcribe"},
        {"language": None, "task": "transcribe"},
        {"language": None, "task": "transcribe"},
    ]
