"""Vocoding rows of many lengths: windows of one size batched (model.vocoding) vs one codec call per
distinct length, on the audio tokenizer alone (random weights; no download), as JSON.

    python scripts/bench_vocoding.py --config tiny --rows 128            # CPU: the tests' and demo's codec
    python scripts/bench_vocoding.py --config real --rows 256 --out v.json   # GPU: the release's codec sizes

Rows get distinct lengths spread over --min-frames..--max-frames, as rows stopping on their own do. Also
reports how far windowed waveforms stray from decoding each row whole (max |difference| / max |sample|).

--encode-clips N also encodes N reference clips of 3-10 s one at a time, as the engine encodes each distinct
reference voice (SynthesisEngine.encode_reference): what an evaluation set, whose rows each bring their own
voice, pays per row on the GPU before its rows decode.

--codec-dtypes float32,bfloat16 measures the windowed vocoding (and the encoding) again with the codec cast
to each later dtype: its speed, how far its waveforms stray from the first dtype's, and the share of encoded
codes that stay the same (the engine's codec runs in the checkpoint's float32; GPU run 7 spent 19 % of a
1,024-row call vocoding).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import resolve_device  # noqa: E402
from model.engine import VOCODE_FRAMES_PER_ROW  # noqa: E402
from model.tiny import (  # noqa: E402
    _fill_codebooks,
    real_audio_tokenizer_config,
    tiny_audio_tokenizer_config,
)
from model.vocoding import margin_for, probe_reach, vocode_rows, window_length  # noqa: E402
from scripts.bench_report import emit, header  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=["real", "tiny"], default="tiny")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--min-frames", type=int, default=150)
    parser.add_argument("--max-frames", type=int, default=349)
    parser.add_argument(
        "--frames-per-call", type=int, default=16 * VOCODE_FRAMES_PER_ROW, help="the engine's at batch 16"
    )
    parser.add_argument("--check-rows", type=int, default=4, help="rows compared with whole decoding")
    parser.add_argument("--encode-clips", type=int, default=0, help="reference clips encoded (0: none)")
    parser.add_argument(
        "--codec-dtypes", default="float32", help="the codec's dtypes, the first the reference"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from transformers import HiggsAudioV2TokenizerModel

    device = resolve_device(args.device)
    torch.manual_seed(0)
    config = real_audio_tokenizer_config() if args.config == "real" else tiny_audio_tokenizer_config()
    dtypes = args.codec_dtypes.split(",")
    codec = HiggsAudioV2TokenizerModel(config).eval().to(device, getattr(torch, dtypes[0]))
    _fill_codebooks(codec)

    @torch.inference_mode()
    def decode(codes: torch.Tensor) -> np.ndarray:
        audio = codec.decode(codes.to(device)).audio_values[:, 0].float().cpu().numpy()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return audio

    span = args.max_frames - args.min_frames + 1
    lengths = [args.min_frames + (i * 37) % span for i in range(args.rows)]
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 1024, (8, n), generator=gen).numpy() for n in lengths]
    reach = probe_reach(decode, 8)
    margin = margin_for(reach)
    report = {
        **header("vocoding", device),
        "config": args.config,
        "rows": args.rows,
        "distinct_lengths": len(set(lengths)),
        "frames": sum(lengths),
        "reach_frames": reach,
        "window_frames": None if margin is None else window_length(margin),
    }
    vocode_rows(decode, rows[:8], margin, args.frames_per_call)  # warm-up: kernels, allocator
    vocode_rows(decode, rows[:8], None, args.frames_per_call)
    waveforms = {}
    for name, m in (("per_length", None), ("windowed", margin)):
        calls = []

        def counted(codes: torch.Tensor, calls=calls) -> np.ndarray:
            calls.append(codes.shape[0])
            return decode(codes)

        waveforms[name], wall_s, x_real_time = timed_vocoding(counted, rows, m, args.frames_per_call)
        report[name] = {"wall_s": wall_s, "codec_calls": len(calls), "x_real_time": x_real_time}
    report["speedup"] = round(report["per_length"]["wall_s"] / report["windowed"]["wall_s"], 2)
    # One call per length decodes each row whole: the waveforms every other way is held to.
    whole = waveforms["per_length"][: args.check_rows]
    report["windowed_max_stray"] = max_stray(waveforms["windowed"], whole)
    if args.encode_clips:
        report["encoding"], codes = encoding_speed(codec, device, args.encode_clips)
    for name in dtypes[1:]:
        codec.to(getattr(torch, name))
        vocode_rows(decode, rows[:8], margin, args.frames_per_call)  # warm-up
        cast, wall_s, x_real_time = timed_vocoding(decode, rows, margin, args.frames_per_call)
        entry = {
            "windowed_wall_s": wall_s,
            "windowed_x_real_time": x_real_time,
            "speedup_vs_first": round(report["windowed"]["wall_s"] / wall_s, 2),
            "max_stray_vs_first": max_stray(cast, whole),
        }
        if args.encode_clips:
            entry["encoding"], other = encoding_speed(codec, device, args.encode_clips)
            same = [float((a == b).mean()) for a, b in zip(codes, other, strict=True)]
            entry["encoding"]["codes_same_as_first"] = round(float(np.mean(same)), 4)
        report[f"codec_{name}"] = entry
    emit(report, args.out)


def timed_vocoding(decode, rows: list[np.ndarray], margin: int | None, frames_per_call: int):
    """(waveforms, wall seconds, x real time) of vocoding `rows` as the engine does (model.vocoding)."""
    started = time.perf_counter()
    waveforms, _ = vocode_rows(decode, rows, margin, frames_per_call)
    wall = time.perf_counter() - started
    audio_s = sum(len(w) for w in waveforms) / 24000
    return waveforms, round(wall, 3), round(audio_s / wall, 1)


def max_stray(waveforms: list[np.ndarray], whole: list[np.ndarray]) -> float:
    """The largest |difference| from the whole-decoded rows, over each row's largest |sample|."""
    return max(
        float(np.abs(w - ref).max() / np.abs(ref).max()) for w, ref in zip(waveforms, whole, strict=False)
    )


def encoding_speed(codec, device: torch.device, clips: int) -> tuple[dict, list[np.ndarray]]:
    """`clips` clips of 3-10 s of noise encoded one at a time, after one warm-up clip; and the first
    few clips' codes."""
    rng = np.random.default_rng(2)
    seconds = [3 + (i * 7) % 8 for i in range(clips)]
    waves = [(0.1 * rng.standard_normal(s * 24000)).astype(np.float32) for s in seconds]
    dtype = next(codec.parameters()).dtype

    @torch.inference_mode()
    def encode(wave: np.ndarray) -> torch.Tensor:
        codes = codec.encode(torch.from_numpy(wave).to(device, dtype)[None, None, :]).audio_codes
        if device.type == "cuda":
            torch.cuda.synchronize()
        return codes

    encode(waves[0])
    started = time.perf_counter()
    codes = [encode(wave) for wave in waves]
    wall = time.perf_counter() - started
    speed = {
        "clips": clips,
        "audio_s": sum(seconds),
        "wall_s": round(wall, 3),
        "ms_per_clip": round(1000 * wall / clips, 1),
        "x_real_time": round(sum(seconds) / wall, 1),
    }
    return speed, [c.cpu().numpy() for c in codes[:8]]


if __name__ == "__main__":
    main()
