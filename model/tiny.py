"""Build a tiny Higgs Audio v2 checkpoint offline, with random weights.

Same classes and file layout as the transformers-format release (model, processor with its chat template,
text tokenizer with the Higgs special tokens, audio tokenizer with DAC + HuBERT branches and 8 codebooks at
25 frames/s); only the sizes differ. Tests and the demo use it because nothing can be downloaded.

    python -m model.tiny OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DacFeatureExtractor,
    GenerationConfig,
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerConfig,
    HiggsAudioV2TokenizerModel,
    PreTrainedTokenizerFast,
)

from model.chat_template import CHAT_TEMPLATE
from model.checkpoint import AUDIO_TOKENIZER_SUBFOLDER, LoadedCheckpoint

# The special tokens the Higgs prompt layout uses, named as in the Llama-3 tokenizer it extends.
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|audio_bos|>",
    "<|AUDIO|>",
    "<|audio_out_bos|>",
    "<|AUDIO_OUT|>",
    "<|audio_eos|>",
    "<|reserved_special_token_6|>",  # the audio delay token
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
    "<|speaker_id_start|>",
    "<|speaker_id_end|>",
]
SOUND_EVENT_TOKENS = ["<SE>", "</SE>", "<SE_s>", "</SE_s>", "<SE_e>", "</SE_e>"]

TEXT_VOCAB_SIZE = 512
# Large enough that the codes, not the random biases, shape the decoded waveform (audible in 16-bit).
CODEBOOK_STD = 1000.0
SEED = 1234


def build_text_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on a fixed corpus, so the build is deterministic and offline."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "Generate audio following instruction. The sun rises in the east and sets in the west.",
        "You are an AI assistant designed to convert text into speech. SPEAKER0 SPEAKER1 feminine masculine",
        "Audio is recorded from a quiet room. It was the night before my birthday. Hooray!",
    ]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
        model_max_length=8192,
    )
    fast.add_special_tokens({"additional_special_tokens": SOUND_EVENT_TOKENS})
    return fast


def tiny_audio_tokenizer_config() -> HiggsAudioV2TokenizerConfig:
    # hop 960 at 24 kHz = 25 frames/s; 2 kbps / (25 fps * 10 bits) = 8 codebooks, as in the release.
    return HiggsAudioV2TokenizerConfig(
        target_bandwidths=[0.5, 1, 1.5, 2],
        codebook_size=1024,
        codebook_dim=8,
        acoustic_model_config={
            "encoder_hidden_size": 4,
            "downsampling_ratios": [8, 5, 4, 2, 3],
            "decoder_hidden_size": 32,  # the smallest that survives five halvings
            "upsampling_ratios": [8, 5, 4, 2, 3],
            "hidden_size": 16,
        },
        semantic_model_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "conv_dim": [8, 8, 8, 8, 8, 8, 8],
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
        },
    )


def tiny_model_config(tokenizer: PreTrainedTokenizerFast) -> HiggsAudioV2Config:
    ids = tokenizer.convert_tokens_to_ids
    return HiggsAudioV2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        num_codebooks=8,
        codebook_size=1026,  # 1024 codes + stream bos/eos, as the converted release
        pad_token_id=ids("<|end_of_text|>"),
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"),
        audio_token_id=ids("<|AUDIO_OUT|>"),
        audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"),
    )


def real_audio_tokenizer_config() -> HiggsAudioV2TokenizerConfig:
    # The release's sizes: default DAC and HuBERT-base branches, hop 960 (25 frames/s), 8 codebooks.
    return HiggsAudioV2TokenizerConfig(
        target_bandwidths=[0.5, 1, 1.5, 2],
        acoustic_model_config={"downsampling_ratios": [8, 5, 4, 2, 3], "upsampling_ratios": [8, 5, 4, 2, 3]},
    )


def real_model_config(tokenizer: PreTrainedTokenizerFast) -> HiggsAudioV2Config:
    """HiggsAudioV2Config defaults (the 5.77 B release) with this tokenizer's special-token ids."""
    tiny = tiny_model_config(tokenizer)
    ids = {k: getattr(tiny, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "audio_token_id")}
    ids |= {k: getattr(tiny, k) for k in ("audio_bos_token_id", "audio_delay_token_id")}
    return HiggsAudioV2Config(codebook_size=1026, **ids)


def _fill_codebooks(audio_tokenizer: HiggsAudioV2TokenizerModel) -> None:
    """Give the codebooks random entries. They are buffers that start at zero (a trained tokenizer learns
    them), which would make every code decode to the same waveform: different seeds must sound different."""
    with torch.no_grad():
        for name, buffer in audio_tokenizer.named_buffers():
            if name.endswith("codebook.embed") or name.endswith("codebook.embed_avg"):
                buffer.normal_(std=CODEBOOK_STD)


def build_components(
    size: str = "tiny",
) -> tuple[HiggsAudioV2ForConditionalGeneration, HiggsAudioV2Processor]:
    """Model and processor with random weights: "tiny" for tests, "real" for the release's sizes."""
    if size not in ("tiny", "real"):
        raise ValueError(f"size must be 'tiny' or 'real', not {size!r}")
    torch.manual_seed(SEED)
    tokenizer = build_text_tokenizer()
    tokenizer_config = tiny_audio_tokenizer_config() if size == "tiny" else real_audio_tokenizer_config()
    audio_tokenizer = HiggsAudioV2TokenizerModel(tokenizer_config).eval()
    _fill_codebooks(audio_tokenizer)
    feature_extractor = DacFeatureExtractor(
        feature_size=1,
        hop_length=1,
        padding_side="right",
        padding_value=0.0,
        sampling_rate=24000,
        return_attention_mask=True,
    )
    processor = HiggsAudioV2Processor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        audio_tokenizer=audio_tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    config = tiny_model_config(tokenizer) if size == "tiny" else real_model_config(tokenizer)
    model = HiggsAudioV2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        ras_win_len=7,
        ras_win_max_num_repeat=2,
    )
    return model, processor


def random_checkpoint(size: str, device, dtype: torch.dtype | None = None) -> LoadedCheckpoint:
    """Model + processor of the given size with random weights, in memory on `device` (bf16 on GPU unless
    `dtype` says otherwise): for benchmarks of the release-size model without a download."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model, processor = build_components(size)
    finally:
        torch.set_default_dtype(torch.float32)
    processor.audio_tokenizer.to(device)
    return LoadedCheckpoint(
        model=model.eval(), processor=processor, device=device, dtype=dtype, name=f"random-{size}"
    )


def build_tiny_checkpoint(out_dir: str | Path) -> Path:
    """Write a self-contained tiny checkpoint folder and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_components("tiny")
    model.save_pretrained(out, safe_serialization=True)
    # The audio tokenizer lives inside the folder and the processor names it by a relative path, which the
    # loader resolves against the checkpoint folder: the folder can be moved or uploaded as it is.
    audio_tokenizer = processor.audio_tokenizer
    audio_tokenizer.save_pretrained(out / AUDIO_TOKENIZER_SUBFOLDER, safe_serialization=True)
    audio_tokenizer.name_or_path = AUDIO_TOKENIZER_SUBFOLDER
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="folder to write the checkpoint into")
    args = parser.parse_args()
    path = build_tiny_checkpoint(args.out_dir)
    print(f"tiny Higgs Audio v2 checkpoint written to {path}")


if __name__ == "__main__":
    main()
