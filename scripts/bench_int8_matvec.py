"""The one-row int8 product (model.int8_matvec) on the release model's weight shapes, against cuBLAS's bf16
product of the same row, as JSON: each shape's error against the CPU path's formula, microseconds a product
and the weight bytes read a second. Both replayed from CUDA graphs, as the decode step runs them.

    python scripts/bench_int8_matvec.py --out bench_int8_matvec.json     # a GPU; ~30 s (Triton tunes first)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.int8_matvec import _tuned, int8_matvec  # noqa: E402
from model.int8_weights import one_row_product, quantize  # noqa: E402
from scripts.bench_report import replayed_us  # noqa: E402

# The weight shapes (output channels, input features) of one release decoder layer's products
# (HiggsAudioV2Config defaults), and how many of each a decode step runs a layer: its attention's and audio
# MLP's seven as transformers writes them, or four with model.fused_projections.
SHAPES = {
    "q_proj, o_proj": (3072, 3072),
    "k_proj, v_proj": (1024, 3072),
    "gate_proj, up_proj": (8192, 3072),
    "down_proj": (3072, 8192),
    "q/k/v fused": (5120, 3072),
    "gate/up fused": (16384, 3072),
}
LAYERS = {
    "separate": {"q_proj, o_proj": 2, "k_proj, v_proj": 2, "gate_proj, up_proj": 2, "down_proj": 1},
    "fused": {"q/k/v fused": 1, "q_proj, o_proj": 1, "gate/up fused": 1, "down_proj": 1},
}


def measure(name: str, n: int, k: int) -> dict:
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    q, scale = quantize(weight)
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    expected = one_row_product(x, q, scale)
    _tuned.configs_timings = None  # set again only where this shape is tuned now, not read from disk
    got = int8_matvec(x, q, scale)  # Triton tunes its block sizes for this shape here
    tuned = _tuned.configs_timings or {}
    int8_us = replayed_us(lambda: int8_matvec(x, q, scale))
    bf16_us = replayed_us(lambda: F.linear(x[None], weight))
    return {
        "weights": name,
        "n": n,
        "k": k,
        "relative_error": round(
            ((got.float() - expected.float()).abs().max() / expected.abs().max()).item(), 6
        ),
        "int8_us": round(int8_us, 2),
        "int8_tb_s": round(n * k / int8_us / 1e6, 3),
        "bf16_cublas_us": round(bf16_us, 2),
        "bf16_tb_s": round(2 * n * k / bf16_us / 1e6, 3),
        "speedup": round(bf16_us / int8_us, 3),
        "config": str(_tuned.best_config),
        "config_us": {str(config): round(ms[0] * 1e3, 2) for config, ms in tuned.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_int8_matvec needs a CUDA GPU: Triton's kernel runs on GPUs only")
    report = {"benchmark": "int8_matvec", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["shapes"] = [measure(name, *shape) for name, shape in SHAPES.items()]
    by_name = {row["weights"]: row for row in report["shapes"]}
    for layout, counts in LAYERS.items():
        layer = {
            kind: sum(count * by_name[name][f"{kind}_us"] for name, count in counts.items())
            for kind in ("int8", "bf16_cublas")
        }
        report[f"layer_us_{layout}"] = {kind: round(us, 1) for kind, us in layer.items()}
        report[f"step_ms_28_layers_{layout}"] = {kind: round(28 * us / 1e3, 3) for kind, us in layer.items()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
