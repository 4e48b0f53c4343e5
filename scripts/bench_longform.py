"""Chapters in lockstep vs chained (model.longform), as JSON: decode steps, prefill forwards and wall time.

    python scripts/bench_longform.py                 # tiny config: 16 chapters of 2-12 chunks, 8 slots, CPU
    python scripts/bench_longform.py --chapters 32 --slots 32 --out r.json
    python scripts/bench_longform.py --config real --device cuda --chapters 48 --slots 32 --chunks 2,5 \
        --steps 150,450                            # the release's size, random bf16 weights

An audiobook's chapters go through the engine together, each chunk with the last ones' codes in its prompt.
`lockstep` is the order before 2026-11-26 18:30 UTC: chunk k of every chapter in one engine call, the next
call once the longest of them is done. `chained` is model.longform.generate_longform itself: a chapter's
next chunk joins the running batch as soon as its last one is done (SynthesisEngine.generate_chained),
waiting up to admission.FOLLOWER_LOOKS looks for others to prefill with, the chapters with the most text left
first; `chained_ungathered` prefills each as it comes, `chained_unranked` takes waiting chunks in arrival order.
Chunk lengths are drawn per chunk (stream-eos ignored, so each runs to its length), as sentence chunking's
chunks vary with their paragraphs, and each chunk's text is as long as its audio; each chapter's chunk
count is drawn too. Chunks carry no reference voice (their prompts: the system prompt, the last
buffer_size chunks, their text). Every order must give every chunk the same codes (on a GPU
in bf16, batch mates may flip a near-tied code, as in bench_gpu.py's agreement check).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model.admission as admission  # noqa: E402
from model.checkpoint import resolve_device  # noqa: E402
from model.engine import EngineOptions, SynthesisEngine  # noqa: E402
from model.longform import LongformText, chunk_request, generate_longform  # noqa: E402
from model.requests import ContextTurn, SynthesisRequest  # noqa: E402
from model.tiny import random_checkpoint  # noqa: E402
from scripts.bench_gpu import counting_steps, script, watch_prefills  # noqa: E402
from scripts.bench_report import emit, header  # noqa: E402


def book(chapters: int, chunks: tuple[int, int], steps: tuple[int, int], seed: int) -> dict[str, list[int]]:
    """Each chapter's chunks' lengths in decode steps (max_new_tokens: stream-eos is ignored)."""
    rng = random.Random(seed)
    return {f"ch{c:02d}": [rng.randint(*steps) for _ in range(rng.randint(*chunks))] for c in range(chapters)}


def texts(plan: dict[str, list[int]], words: list[list[str]]) -> list[LongformText]:
    return [
        LongformText(key=key, base=SynthesisRequest(text="", seed=7 + i), chunks=words[i][: len(lengths)])
        for i, (key, lengths) in enumerate(plan.items())
    ]


def request(text: LongformText, plan: dict[str, list[int]], buffer_size: int) -> SynthesisRequest:
    k = len(text.done)
    return replace(chunk_request(text, k, buffer_size), max_new_tokens=plan[text.key][k])


def lockstep(engine, plan: dict[str, list[int]], words, buffer_size: int) -> list[LongformText]:
    chapters = texts(plan, words)
    while active := [t for t in chapters if len(t.done) < len(t.chunks)]:
        results = engine.generate([request(t, plan, buffer_size) for t in active])
        for text, result in zip(active, results, strict=True):
            text.done.append(ContextTurn(text.chunks[len(text.done)], result.audio_codes))
    return chapters


class Paced:
    """The engine, each chunk's max_new_tokens taken from the plan (generate_longform gives every chunk its
    chapter's); the rest is the engine's generate_chained, ranked by generate_longform's priority or not."""

    def __init__(self, engine, plan: dict[str, list[int]], ranked: bool) -> None:
        self.engine, self.plan, self.ranked = engine, plan, ranked

    def generate_chained(self, requests, follow, priority=None):
        asked = {}  # by the paced request's id: it (kept alive) and generate_longform's own request

        def paced(request: SynthesisRequest | None) -> SynthesisRequest | None:
            if request is None:
                return None
            key, k = request.id.rsplit("#", 1)
            own = replace(request, max_new_tokens=self.plan[key][int(k)])
            asked[id(own)] = (own, request)
            return own

        def theirs(own: SynthesisRequest) -> SynthesisRequest:
            return asked[id(own)][1]

        rank = (lambda own: priority(theirs(own))) if priority and self.ranked else None
        chained = self.engine.generate_chained(
            [paced(r) for r in requests], lambda own, result: paced(follow(theirs(own), result)), rank
        )
        for own, result in chained:
            yield asked.pop(id(own))[1], result


def chained(
    engine, plan: dict[str, list[int]], words, buffer_size: int, ranked: bool = True
) -> list[LongformText]:
    return generate_longform(Paced(engine, plan, ranked), texts(plan, words), buffer_size)


def measure(engine, order, plan: dict[str, list[int]], words, buffer_size: int) -> tuple[dict, list]:
    prefills = watch_prefills(engine)
    with counting_steps() as steps:
        started = time.perf_counter()
        chapters = order(engine, plan, words, buffer_size)
        engine._sync()
        wall = time.perf_counter() - started
    del engine._prefill
    frames = sum(t.done[k].codes.shape[1] for t in chapters for k in range(len(t.chunks)))
    seconds = frames / 25
    return {
        "decode_steps": len(steps),
        "prefill_forwards": len(prefills),
        "prefill_s": round(sum(prefills), 2),
        "wall_s": round(wall, 2),
        "audio_s": round(seconds, 1),
        "x_real_time": round(seconds / wall, 2),
        # Chunk steps a decode step advanced: how full the batch ran.
        "rows_a_step": round(sum(map(sum, plan.values())) / len(steps), 2),
    }, chapters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chapters", type=int, default=16)
    parser.add_argument("--chunks", default="2,12", help="chunks a chapter, least,most")
    parser.add_argument("--steps", default="40,120", help="decode steps a chunk (max_new_tokens), least,most")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--buffer-size", type=int, default=2)
    parser.add_argument("--config", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--device", default=None, help="default: cuda where there is one")
    parser.add_argument(
        "--tokens-a-step", type=float, default=0.2, help="a chunk's text tokens per decode step it takes"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    chunks = tuple(int(n) for n in args.chunks.split(","))
    lengths = tuple(int(n) for n in args.steps.split(","))
    plan = book(args.chapters, chunks, lengths, args.seed)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    started = time.perf_counter()
    loaded = random_checkpoint(args.config, device)
    engine = SynthesisEngine(loaded, EngineOptions(max_batch_size=args.slots, ignore_eos=True))
    tokenizer = loaded.processor.tokenizer
    # Each chunk's text as long as its audio: what model.longform ranks chapters by.
    words = [
        [script(100 * i + k, max(4, round(n * args.tokens_a_step)), tokenizer) for k, n in enumerate(lengths)]
        for i, lengths in enumerate(plan.values())
    ]
    # Warm-up (CUDA graphs of each bucket, the slots): the same chapters, an eighth of the steps.
    warm = {key: [max(16, n // 8) for n in lengths] for key, lengths in plan.items()}
    chained(engine, warm, words, args.buffer_size)
    build_s = time.perf_counter() - started
    work = sum(map(sum, plan.values()))
    report = header("longform", device)
    report.update(
        {
            "chapters": args.chapters,
            "chunks": sum(map(len, plan.values())),
            "slots": args.slots,
            "buffer_size": args.buffer_size,
            "config": args.config,
            "dtype": str(loaded.dtype),
            "build_and_warm_up_s": round(build_s, 1),
            # No order takes fewer steps than the longest chapter's chunks one after another, nor than
            # all chunks' steps over the slots.
            "fewest_steps": max(max(map(sum, plan.values())), -(-work // args.slots)),
        }
    )
    runs = {}
    gathered = admission.FOLLOWER_LOOKS
    for name, order, looks in (
        ("lockstep", lockstep, gathered),
        ("chained", chained, gathered),
        ("chained_ungathered", chained, 0),
        ("chained_unranked", partial(chained, ranked=False), gathered),
    ):
        default, admission.FOLLOWER_LOOKS = admission.FOLLOWER_LOOKS, looks
        try:
            report[name], runs[name] = measure(engine, order, plan, words, args.buffer_size)
        finally:
            admission.FOLLOWER_LOOKS = default
        if name != "lockstep":
            report[name].update(against_lockstep(report, runs, name))
        if args.out:  # what a run cut off by a timeout measured
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    emit(report, args.out)


def against_lockstep(report: dict, runs: dict, name: str) -> dict:
    pairs = [
        (a.codes, b.codes)
        for x, y in zip(runs["lockstep"], runs[name], strict=True)
        for a, b in zip(x.done, y.done, strict=True)
    ]
    ours, theirs = report[name], report["lockstep"]
    return {
        "chunks_with_lockstep_codes": sum(np.array_equal(a, b) for a, b in pairs),
        "steps_ratio": round(theirs["decode_steps"] / ours["decode_steps"], 3),
        "wall_ratio": round(theirs["wall_s"] / ours["wall_s"], 3),
    }


if __name__ == "__main__":
    main()
