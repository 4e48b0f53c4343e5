"""What every benchmark script does with its report: a common header; JSON on stdout, and in --out when given."""

from __future__ import annotations

import json
from pathlib import Path


def header(benchmark: str, device) -> dict:
    """The fields every benchmark's report opens with: what ran, on which torch.device, with which torch."""
    import torch  # here, not at the top: bench_pipeline's driver measures its memory without torch

    return {
        "benchmark": benchmark,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def emit(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
