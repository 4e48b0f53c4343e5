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


def replayed_us(fn, launches: int = 50, replays: int = 20) -> float:
    """Microseconds per call of `fn` on a GPU, `launches` calls captured in one CUDA graph and replayed, as the
    decode step runs its kernels."""
    import torch

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (launches * replays)


def emit(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
