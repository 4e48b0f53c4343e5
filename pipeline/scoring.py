"""Objective scores for evaluation runs: WER/CER with Whisper and speaker similarity with WavLM x-vectors.

Normalisation follows Seed-TTS Eval's run_wer.py so numbers are comparable with published ones: strip
punctuation except apostrophes, lowercase English, score Chinese per character, and average the per-utterance
WERs (not a corpus WER).
"""

from __future__ import annotations

import io
import logging
import string
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf
import torch
import torchaudio

logger = logging.getLogger(__name__)

DEFAULT_ASR_MODEL = "openai/whisper-large-v3"
DEFAULT_SV_MODEL = "microsoft/wavlm-base-plus-sv"
SAMPLE_RATE = 16_000
# Whisper's short-form window; longer audio is cut there, and the row is flagged so the WER can be trusted.
WHISPER_WINDOW_S = 30.0

# Seed-TTS strips string.punctuation plus zhon's CJK punctuation, which includes full-width ASCII symbols.
_EXTRA_PUNCT = set(string.punctuation) | {chr(ord(c) + 0xFEE0) for c in string.punctuation}
_LANGUAGE_NAMES = {"english": "en", "chinese": "zh", "mandarin": "zh"}


# --- text and vector arithmetic ---------------------------------------------------------------------------


def language_code(language: str | None) -> str:
    """ISO code for "en", "English", "en-US", ...; the eval sets spell languages in several ways."""
    if not language:
        return "en"
    lowered = language.strip().lower()
    return _LANGUAGE_NAMES.get(lowered, lowered.split("-")[0].split("_")[0])


def _is_punct(ch: str) -> bool:
    return ch != "'" and (ch in _EXTRA_PUNCT or unicodedata.category(ch).startswith("P"))


def normalize_for_wer(text: str, language: str = "en") -> str:
    """Seed-TTS Eval normalisation; for zh the characters come back space-separated so jiwer gives CER."""
    # Curly apostrophes are folded first: Whisper writes "don't", scripts often "don’t", and Seed-TTS would
    # delete the curly one and count a word error that is only typography.
    text = text.replace("\u2019", "'")
    kept = "".join(ch for ch in text if not _is_punct(ch))
    if language_code(language) == "zh":
        return " ".join(ch for ch in kept if not ch.isspace())
    return " ".join(kept.lower().split())


def wer(reference: str, hypothesis: str, language: str = "en") -> float:
    """WER (CER for zh) of ``hypothesis`` against ``reference`` after normalisation.

    Raises ValueError when the reference normalises to nothing, where WER has no defined value.
    """
    ref = normalize_for_wer(reference, language)
    hyp = normalize_for_wer(hypothesis, language)
    if not ref:
        raise ValueError(f"reference {reference!r} is empty after normalisation")
    return float(jiwer.wer(ref, hyp))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"vectors differ in size: {x.size} vs {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("vectors contain NaN or infinity")
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    if norm == 0.0:
        raise ValueError("cosine similarity of a zero vector is undefined")
    # Clipped: rounding can push identical vectors a hair past 1.
    return float(np.clip(np.dot(x, y) / norm, -1.0, 1.0))


def aggregate(scored: Sequence[dict], by: str | None = "category") -> dict:
    """Mean WER and SIM over rows that have them, overall and per value of ``by`` when rows carry it."""
    out = _means(scored)
    if by is not None and any(row.get(by) is not None for row in scored):
        groups: dict[str, list[dict]] = {}
        for row in scored:
            groups.setdefault(str(row.get(by)), []).append(row)
        out["groups"] = {key: _means(rows) for key, rows in sorted(groups.items())}
    return out


def _means(rows: Sequence[dict]) -> dict:
    wers = [r["wer"] for r in rows if r.get("wer") is not None]
    sims = [r["sim"] for r in rows if r.get("sim") is not None]
    return {
        "count": len(rows),
        "wer": float(np.mean(wers)) if wers else None,
        "sim": float(np.mean(sims)) if sims else None,
        "wer_count": len(wers),
        "sim_count": len(sims),
        "errors": sum(1 for r in rows if r.get("error")),
    }


# --- models ----------------------------------------------------------------------------------------------


def unloadable(model: str, kind: str) -> str | None:
    """Why the scorer could not load `model` (a hub id or a folder) as its ASR (`kind` "asr") or speaker
    model ("sv"), or None. Only the config and processor files are read, so a run can find out before it
    synthesises for hours and then fails to score (offline, a model missing from the cache)."""
    from transformers import AutoConfig, AutoFeatureExtractor, WhisperProcessor

    try:
        AutoConfig.from_pretrained(model)
        (WhisperProcessor if kind == "asr" else AutoFeatureExtractor).from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the answer
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else 'no detail'}"
    return None


class Scorer:
    """Whisper ASR + WavLM speaker verification, loaded once and applied in batches.

    ``score`` takes rows with ``text``, ``audio`` (the synthesised clip) and optionally ``reference_audio``
    (the prompt clip); audio is encoded bytes or a float waveform with ``sample_rate`` /
    ``reference_sample_rate``. ``language`` defaults to English; ``id`` and ``category`` are copied over.
    """

    def __init__(
        self,
        asr_model: str = DEFAULT_ASR_MODEL,
        sv_model: str = DEFAULT_SV_MODEL,
        device: str | None = None,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import (
            AutoFeatureExtractor,
            WavLMForXVector,
            WhisperForConditionalGeneration,
            WhisperProcessor,
        )

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Half precision is how Whisper large is normally run on GPUs; CPUs are slow or wrong in fp16.
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.batch_size = batch_size
        self.asr_processor = WhisperProcessor.from_pretrained(asr_model)
        self.asr = WhisperForConditionalGeneration.from_pretrained(asr_model, dtype=self.dtype)
        self.asr.to(self.device).eval()
        self.sv_extractor = AutoFeatureExtractor.from_pretrained(sv_model)
        # WavLM base is small, and the x-vector statistics pooling is where fp16 would lose precision.
        self.sv = WavLMForXVector.from_pretrained(sv_model).to(self.device).eval()

    @torch.inference_mode()
    def transcribe(
        self, waveforms: Sequence[np.ndarray], sample_rate: int, language: str | None
    ) -> list[str]:
        audio = [_resample(w, sample_rate) for w in waveforms]
        texts = [""] * len(audio)
        todo = [i for i, w in enumerate(audio) if w.size]  # Whisper's feature extractor rejects empty input
        kwargs = self._generate_kwargs(language)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            features = self.asr_processor.feature_extractor(
                [audio[i] for i in batch],
                sampling_rate=SAMPLE_RATE,
                return_tensors="pt",
                return_attention_mask=True,
            )
            ids = self.asr.generate(
                features.input_features.to(self.device, self.dtype),
                attention_mask=features.attention_mask.to(self.device),
                **kwargs,
            )
            for i, text in zip(
                batch, self.asr_processor.batch_decode(ids, skip_special_tokens=True), strict=True
            ):
                texts[i] = text.strip()
        return texts

    def _generate_kwargs(self, language: str | None) -> dict:
        config = self.asr.generation_config
        if getattr(config, "is_multilingual", True) is False or not hasattr(config, "lang_to_id"):
            return {}  # English-only or old-style checkpoints refuse language/task arguments
        kwargs: dict = {"task": "transcribe"} if hasattr(config, "task_to_id") else {}
        if language is not None:
            code = language_code(language)
            if f"<|{code}|>" in config.lang_to_id:
                kwargs["language"] = code
            else:
                logger.warning("ASR model has no language token for %r; letting it detect", language)
        return kwargs

    @torch.inference_mode()
    def embed(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
        """Speaker embeddings, one row per waveform."""
        audio = [_resample(w, sample_rate) for w in waveforms]
        out = []
        for start in range(0, len(audio), self.batch_size):
            inputs = self.sv_extractor(
                audio[start : start + self.batch_size],
                sampling_rate=SAMPLE_RATE,
                padding=True,
                return_attention_mask=True,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.sv(**inputs).embeddings.float().cpu().numpy())
        dim = self.sv.config.xvector_output_dim
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)

    def score(self, rows: Sequence[dict]) -> list[dict]:
        """Per row: hypothesis, wer (vs ``text``), sim (output vs reference audio), and an error if any."""
        results = []
        outputs: dict[int, np.ndarray] = {}
        references: dict[int, np.ndarray] = {}
        for i, row in enumerate(rows):
            result = {
                "id": row.get("id"),
                "category": row.get("category"),
                "language": language_code(row.get("language")),
                "text": row.get("text"),
                "hypothesis": None,
                "wer": None,
                "sim": None,
                "duration_s": None,
                "asr_truncated": None,
                "error": None,
            }
            results.append(result)
            try:
                audio = _load(row.get("audio"), row.get("sample_rate"), "audio")
                if audio.size == 0:
                    raise ValueError("audio is empty")
                outputs[i] = audio
                result["duration_s"] = audio.size / SAMPLE_RATE
                result["asr_truncated"] = result["duration_s"] > WHISPER_WINDOW_S
                if row.get("reference_audio") is not None:
                    reference = _load(row["reference_audio"], row.get("reference_sample_rate"), "reference")
                    if reference.size:
                        references[i] = reference
            except (ValueError, RuntimeError) as exc:  # soundfile's decode errors are RuntimeErrors
                result["error"] = str(exc)

        by_language: dict[str, list[int]] = {}
        for i in outputs:
            by_language.setdefault(results[i]["language"], []).append(i)
        for language, indices in by_language.items():
            texts = self.transcribe([outputs[i] for i in indices], SAMPLE_RATE, language)
            for i, hypothesis in zip(indices, texts, strict=True):
                results[i]["hypothesis"] = hypothesis
                try:
                    results[i]["wer"] = wer(str(rows[i].get("text") or ""), hypothesis, language)
                except ValueError as exc:
                    results[i]["error"] = f"wer: {exc}"

        paired = sorted(references)
        if paired:
            embeddings = self.embed(
                [outputs[i] for i in paired] + [references[i] for i in paired], SAMPLE_RATE
            )
            for k, i in enumerate(paired):
                try:
                    results[i]["sim"] = cosine_similarity(embeddings[k], embeddings[len(paired) + k])
                except ValueError as exc:  # a zero embedding, e.g. from fp overflow on garbage audio
                    results[i]["error"] = f"sim: {exc}"
        return results

    @staticmethod
    def aggregate(scored: Sequence[dict], by: str | None = "category") -> dict:
        return aggregate(scored, by)


def _load(audio: object, sample_rate: object, what: str) -> np.ndarray:
    """Mono float32 at 16 kHz from encoded bytes or a waveform with its sample rate."""
    if audio is None:
        raise ValueError(f"{what} is missing")
    if isinstance(audio, (bytes, bytearray, memoryview)):
        data, rate = sf.read(io.BytesIO(bytes(audio)), dtype="float32", always_2d=False)
        return _resample(data, rate)
    if sample_rate is None:
        raise ValueError(f"{what} is a waveform without a sample rate")
    return _resample(np.asarray(audio), int(sample_rate))


def _resample(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    audio = np.asarray(waveform, dtype=np.float32)
    if audio.ndim == 2:
        # soundfile's (frames, channels); a (channels, frames) array would have far more columns than rows.
        audio = audio.mean(axis=1) if audio.shape[0] >= audio.shape[1] else audio.mean(axis=0)
    elif audio.ndim != 1:
        raise ValueError(f"waveform must be 1-D or 2-D, got shape {audio.shape}")
    if sample_rate == SAMPLE_RATE or audio.size == 0:
        return audio
    return torchaudio.functional.resample(torch.from_numpy(audio), sample_rate, SAMPLE_RATE).numpy()


# --- tiny offline models ----------------------------------------------------------------------------------


def build_tiny_scoring_models(out_dir: str | Path) -> tuple[str, str]:
    """Tiny random Whisper and WavLM x-vector checkpoints under out_dir/whisper and out_dir/wavlm.

    Same classes and processors as the real models, so Scorer runs its real code paths offline in tests.
    """
    from tokenizers import pre_tokenizers
    from transformers import (
        GenerationConfig,
        Wav2Vec2FeatureExtractor,
        WavLMConfig,
        WavLMForXVector,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    out = Path(out_dir)
    whisper_dir, wavlm_dir = out / "whisper", out / "wavlm"
    torch.manual_seed(0)

    # A byte-level vocabulary with no merges encodes any text, and the special tokens are the ones
    # Whisper's generate() looks up to force language, task and no-timestamps.
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    languages, tasks = ["<|en|>", "<|zh|>"], ["<|translate|>", "<|transcribe|>"]
    specials = ["<|startoftranscript|>", *languages, *tasks, "<|startoflm|>", "<|startofprev|>"]
    specials += ["<|nospeech|>", "<|notimestamps|>"]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = dict(zip(specials, tokenizer.convert_tokens_to_ids(specials), strict=True))
    eot = vocab["<|endoftext|>"]
    max_target = 24  # short random transcripts keep the test fast
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,  # 30 s of 10 ms frames after the stride-2 conv, as in every Whisper
        max_target_positions=max_target,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    whisper = WhisperForConditionalGeneration(config)
    whisper.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=max_target,
        is_multilingual=True,
        lang_to_id={tok: ids[tok] for tok in languages},
        task_to_id={tok.strip("<|>"): ids[tok] for tok in tasks},
        no_timestamps_token_id=ids["<|notimestamps|>"],
    )
    whisper.save_pretrained(whisper_dir)
    WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer
    ).save_pretrained(whisper_dir)

    wavlm = WavLMForXVector(
        WavLMConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16,) * 7,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            num_buckets=32,
            max_bucket_distance=64,
            tdnn_dim=(32, 32, 32, 32, 64),
            xvector_output_dim=16,
        )
    )
    wavlm.save_pretrained(wavlm_dir)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=False,
        return_attention_mask=True,
    ).save_pretrained(wavlm_dir)
    return str(whisper_dir), str(wavlm_dir)
