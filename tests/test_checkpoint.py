"""Loading the tiny checkpoint through the same loader as a real one: local folder, moved folder, s3://."""

import shutil

import pytest
import s3fs

from model.checkpoint import CheckpointSpec, load_checkpoint, resolve_dtype
from model.engine import SynthesisEngine
from model.requests import SynthesisRequest


def speaks(loaded) -> bool:
    (result,) = SynthesisEngine(loaded).generate([SynthesisRequest(text="Hello.", max_new_tokens=20, seed=3)])
    return result.ok and len(result.waveform) > 0


def test_the_tiny_checkpoint_loads_from_a_local_folder_with_the_release_classes(tiny_checkpoint):
    loaded = load_checkpoint(CheckpointSpec(source=tiny_checkpoint, device="cpu"))
    assert type(loaded.model).__name__ == "HiggsAudioV2ForConditionalGeneration"
    assert type(loaded.processor).__name__ == "HiggsAudioV2Processor"
    assert type(loaded.processor.audio_tokenizer).__name__ == "HiggsAudioV2TokenizerModel"
    tokenizer_config = loaded.processor.audio_tokenizer.config
    assert (tokenizer_config.num_quantizers, tokenizer_config.frame_rate, tokenizer_config.sample_rate) == (
        8,
        25,
        24000,
    )
    assert loaded.model.config.codebook_size == 1026
    assert speaks(loaded)


def test_the_folder_is_relocatable(tiny_checkpoint, tmp_path):
    moved = shutil.copytree(tiny_checkpoint, tmp_path / "elsewhere")
    assert speaks(load_checkpoint(CheckpointSpec(source=str(moved), device="cpu")))


def test_the_checkpoint_loads_from_s3_and_is_copied_once(tiny_checkpoint, s3_server, s3_bucket, tmp_path):
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    fs.put(tiny_checkpoint + "/", f"{s3_bucket}/ckpt/tiny/", recursive=True)
    spec = CheckpointSpec(
        source=f"s3://{s3_bucket}/ckpt/tiny",
        device="cpu",
        cache_dir=str(tmp_path / "cache"),
        storage_options=s3_server.storage_options,
    )
    assert speaks(load_checkpoint(spec))
    copies = list((tmp_path / "cache" / "checkpoints").iterdir())
    assert len(copies) == 1 and (copies[0] / ".complete").exists()
    load_checkpoint(spec)
    assert list((tmp_path / "cache" / "checkpoints").iterdir()) == copies


def test_a_missing_local_folder_fails_with_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(CheckpointSpec(source=str(tmp_path / "nowhere"), device="cpu"))


def test_dtype_defaults_to_float32_on_cpu_and_bfloat16_on_gpu():
    import torch

    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"dtype": "int8"}, "model.dtype='int8' is not one of bfloat16"),
        ({"device": "tpu"}, "model.device='tpu'"),
    ],
)
def test_a_checkpoint_spec_rejects_unknown_dtypes_and_devices_when_made(setting, message):
    with pytest.raises(ValueError, match=message):
        CheckpointSpec(source="eustlb/higgs-audio-v2-generation-3B-base", **setting)
    assert CheckpointSpec(source="x", device="cuda:1", dtype="bfloat16").device == "cuda:1"
