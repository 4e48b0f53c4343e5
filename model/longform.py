"""Long-form generation with voice carry-over (upstream Higgs Audio v2's chunked method).

A text is split into chunks that are generated in order; each chunk sees the references and the last N
generated chunks (text + codes) as earlier turns, so the narrator does not drift. Many texts (chapters)
go through the engine together, each chunk joining the running batch as soon as the one before it is done.
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
    """Generate every missing chunk; `on_chunk` sees each new chunk (to persist it) once its audio exists,
    a text's chunks in order.

    A text's next chunk starts as soon as its last one's codes exist: it joins the engine's running batch
    (SynthesisEngine.generate_chained) rather than waiting for the other texts' chunks. A chunk that fails
    stops its text (error set); the other texts go on.
    """
    # By request object (follow and the results hand back the very requests made here, and texts' keys need
    # not be unique); each entry holds its request, so no id is reused while it is in use.
    owners: dict[int, tuple[SynthesisRequest, LongformText, int]] = {}

    def next_chunk(text: LongformText) -> SynthesisRequest | None:
        k = len(text.done)
        if text.error is not None or k >= len(text.chunks):
            return None
        request = chunk_request(text, k, buffer_size)
        owners[id(request)] = (request, text, k)
        return request

    def follow(request: SynthesisRequest, result: SynthesisResult) -> SynthesisRequest | None:
        _, text, k = owners[id(request)]
        if not result.ok or text.error is not None:
            return None
        text.done.append(ContextTurn(text.chunks[k], result.audio_codes))
        return next_chunk(text)

    def left(request: SynthesisRequest) -> float:
        """The text still to speak from this chunk on: the texts with most left go first, so the batch does
        not end on a few long ones."""
        _, text, k = owners[id(request)]
        return sum(len(chunk) for chunk in text.chunks[k:])

    first = [request for request in map(next_chunk, texts) if request is not None]
    for request, result in engine.generate_chained(first, follow, priority=left):
        _, text, k = owners.pop(id(request))
        if text.error is not None:
            continue
        if not result.ok:
            text.error = f"chunk {k}: {result.error}"
        elif on_chunk is not None:
            on_chunk(text, k, result)
    return texts
