"""Load a transformers-format Higgs Audio v2 checkpoint: model + processor (+ its audio tokenizer).

A source is a Hugging Face repo id, a local folder, or an fsspec URI (s3://…, gs://…) that is copied once
into a local cache folder. Only safetensors weights are loaded and remote code is never trusted.

The original bosonai/higgs-audio-v2-* repos are not in transformers' format (model_type "higgs_audio" is not
registered); convert them with transformers' convert_higgs_audio_v2_to_hf.py first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model.options import (
    AUDIO_TOKENIZER_SUBFOLDER,
    DEFAULT_AUDIO_TOKENIZER_ID,
    DEFAULT_CACHE_DIR,
    CheckpointSpec,
    is_remote_uri,
)


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    processor: object
    device: torch.device
    dtype: torch.dtype
    name: str


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)  # one of options.FLOAT_DTYPES: CheckpointSpec checks it


def materialize(source: str, cache_dir: str | Path | None = None, storage_options: dict | None = None) -> str:
    """Return something from_pretrained can open: a local folder for URIs and paths, the id for hub repos."""
    if source.startswith("file://"):
        return source[len("file://") :]
    if not is_remote_uri(source):
        return source
    import fsspec

    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    local = Path(cache_dir or DEFAULT_CACHE_DIR) / "checkpoints" / digest
    done = local / ".complete"
    if not done.exists():
        # Copy into a temporary sibling first so an interrupted copy never looks complete.
        partial = local.with_name(local.name + ".partial")
        fs.get(root.rstrip("/") + "/", str(partial), recursive=True)
        if local.exists():
            import shutil

            shutil.rmtree(local)
        partial.rename(local)
        done.write_text(source)
    return str(local)


def _audio_tokenizer_source(folder: str, override: str | None) -> str:
    if override:
        return override
    local = Path(folder)
    if (local / AUDIO_TOKENIZER_SUBFOLDER / "config.json").exists():
        return str(local / AUDIO_TOKENIZER_SUBFOLDER)
    config_path = local / "processor_config.json"
    if config_path.exists():
        named = (
            json.loads(config_path.read_text()).get("audio_tokenizer", {}).get("audio_tokenizer_name_or_path")
        )
        if named and not (local / named).exists():
            return named
    return DEFAULT_AUDIO_TOKENIZER_ID


def load_checkpoint(spec: CheckpointSpec) -> LoadedCheckpoint:
    from transformers import (
        AutoTokenizer,
        DacFeatureExtractor,
        HiggsAudioV2ForConditionalGeneration,
        HiggsAudioV2Processor,
        HiggsAudioV2TokenizerModel,
    )
    from transformers.utils import cached_file

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    folder = materialize(spec.source, spec.cache_dir, spec.storage_options)
    local_dir = folder if Path(folder).is_dir() else None
    if local_dir is None and (spec.source.startswith((".", "/")) or is_remote_uri(spec.source)):
        raise FileNotFoundError(f"checkpoint folder {spec.source!r} does not exist")

    common = {"trust_remote_code": False}
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(
        folder,
        dtype=dtype,
        use_safetensors=True,
        attn_implementation=spec.attn_implementation,
        **common,
    )
    model.to(device).eval()

    # Assemble the processor from its parts: the released processor_config names its audio tokenizer by repo
    # id, ours by a path relative to the folder, which from_pretrained would resolve against the cwd.
    config_file = cached_file(folder, "processor_config.json")
    processor_config = json.loads(Path(config_file).read_text())
    template_file = cached_file(folder, "chat_template.jinja", _raise_exceptions_for_missing_entries=False)
    chat_template = (
        Path(template_file).read_text() if template_file else processor_config.get("chat_template")
    )
    audio_tokenizer = HiggsAudioV2TokenizerModel.from_pretrained(
        _audio_tokenizer_source(local_dir or folder, spec.audio_tokenizer), use_safetensors=True, **common
    )
    audio_tokenizer.to(device).eval()
    feature_kwargs = {
        k: v
        for k, v in processor_config.get("feature_extractor", {}).items()
        if k != "feature_extractor_type"
    }
    token_kwargs = {
        k: processor_config[k]
        for k in (
            "audio_token",
            "audio_bos_token",
            "audio_eos_token",
            "audio_delay_token",
            "audio_stream_bos_id",
            "audio_stream_eos_id",
        )
        if k in processor_config
    }
    processor = HiggsAudioV2Processor(
        feature_extractor=DacFeatureExtractor(**feature_kwargs),
        tokenizer=AutoTokenizer.from_pretrained(folder, **common),
        audio_tokenizer=audio_tokenizer,
        chat_template=chat_template,
        **token_kwargs,
    )
    return LoadedCheckpoint(model=model, processor=processor, device=device, dtype=dtype, name=spec.source)
