"""CPU time to decode a reference clip to the codec's rate (model.reference_audio.decode_reference), as JSON.

    python scripts/bench_references.py --seconds 10 --out refs.json

The dataset job's fetch stage pays this beside the GPU actors; before, each synthesis actor paid it per
distinct clip with its GPU idle. 16-bit WAV clips of noise at common recording rates.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.reference_audio import decode_reference  # noqa: E402
from model.requests import CODEC_SAMPLE_RATE  # noqa: E402
from scripts.bench_report import emit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rates", default="16000,22050,24000,44100,48000")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    report = {
        "benchmark": "reference_decoding",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clip_seconds": args.seconds,
        "ms_per_clip": {},
    }
    for rate in (int(r) for r in args.rates.split(",")):
        samples = (rng.standard_normal(int(rate * args.seconds)) * 0.1).astype(np.float32)
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
        data = buffer.getvalue()
        decode_reference(data, CODEC_SAMPLE_RATE)  # warm-up: resampling kernels
        started = time.perf_counter()
        for _ in range(args.repeats):
            decode_reference(data, CODEC_SAMPLE_RATE)
        report["ms_per_clip"][str(rate)] = round((time.perf_counter() - started) / args.repeats * 1e3, 2)
    emit(report, args.out)


if __name__ == "__main__":
    main()
