"""Long-form generation with voice carry-over (upstream Higgs Audio v2's chunked method).

A text is split into chunks that are generated in order; each chunk sees the references and the last N
generated chunks (text + codes) as earlier turns, so the narrator does not drift. Many texts (chapters)
advance in lockstep: chunk k of every text goes through the engine in one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from model.engine import SynthesisEngine
from model.requests import ContextTurn, SynthesisRequest, SynthesisResult


@dataclass
class LongformText:
    key: str
    base: SynthesisRequest  # voice, prompts and sampling; its text is ignored
    chunks: list[str]
    # Chunks generated earlier (resume), oldest first: the first len(done) chunks are not generated again.
    done: list[ContextTurn] = field(default_factory=list)
    error: str | None = None


def context_window(done: list[ContextTurn], buffer_size: int | None) -> list[ContextTurn]:
    """The last `buffer_size` generated chunks (all of them when None); the references are kept apart."""
    if buffer_size is None:
        return list(done)
    return list(done[-buffer_size:]) if buffer_size > 0 else []


def chunk_request(text: LongformText, k: int, buffer_size: int | None) -> SynthesisRequest:
    # Each chunk gets its own seed so a resumed chapter generates exactly what an uninterrupted one would.
    return replace(
        text.base,
        id=f"{text.key}#{k}",
        text=text.chunks[k],
        context=context_window(text.done[:k], buffer_size),
        seed=text.base.seed + k,
    )


def generate_longform(
    engine: SynthesisEngine,
    texts: list[LongformText],
    buffer_size: int | None = 2,
    on_chunk: Callable[[LongformText, int, SynthesisResult], None] | None = None,
) -> list[LongformText]:
    """Generate every missing chunk; `on_chunk` sees each new chunk (to persist it) as soon as it exists.

    A chunk that fails stops its text (error set); the other texts go on.
    """
    while True:
        active = [t for t in texts if t.error is None and len(t.done) < len(t.chunks)]
        if not active:
            return texts
        requests = [chunk_request(t, len(t.done), buffer_size) for t in active]
        for text, result in zip(active, engine.generate(requests), strict=True):
            k = len(text.done)
            if not result.ok:
                text.error = f"chunk {k}: {result.error}"
                continue
            text.done.append(ContextTurn(text.chunks[k], result.audio_codes))
            if on_chunk is not None:
                on_chunk(text, k, result)
