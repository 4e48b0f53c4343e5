"""Chapter rows -> generated chunks, persisted one by one (the GPU stage of the audiobook run).

Each actor holds one engine and renders a batch of chapters together with `generate_longform` (each
chapter's next chunk joins the running batch as soon as the last one is done), every chunk conditioned on
the voice and the last `buffer_size` chunks. Every chunk is stored as soon as its audio is decoded (in
calls that take the chunks finished meanwhile), so a run killed after hours loses about the chunk each
chapter had in flight: the next run loads the stored chunks back as the chapters' history and generates
only what is missing.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import soundfile as sf

from model.longform import LongformText, generate_longform
from model.requests import ContextTurn, RequestError, SynthesisResult
from pipeline.attempts import AttemptLog
from pipeline.book_layout import chunk_dir, chunk_key, plan_key
from pipeline.manifest import to_request
from pipeline.stages import pack, unpack
from pipeline.storage import Storage


@dataclass
class ChapterSettings:
    output: str
    checkpoint: Any  # model.checkpoint.CheckpointSpec
    engine: Any = None  # model.engine.EngineOptions
    storage_options: dict | None = None
    buffer_size: int | None = 2  # earlier chunks each chunk hears; None: all of them
    # Chunks one chapter may generate in one run (None: all). A chapter left short is "incomplete" and
    # resumes on the next run; lets a run be cut into slices, and tests stand in for a killed run with it.
    max_new_chunks: int | None = None


class ChunkStore:
    """The persisted chunks of one chapter: codes (.npy) for the history, audio (.wav) for mastering, and a
    .cutoff marker beside a chunk that max_new_tokens cut off (its finish_reason), so the chapter's record
    names it whichever run generated it."""

    def __init__(self, storage: Storage, book_id: str, chapter: int) -> None:
        self.storage = storage
        self.book_id = book_id
        self.chapter = chapter
        self.cut_off: set[int] = set()  # chunks done and cut off
        self._markers: set[str] = set()  # .cutoff keys stored, done or not

    def resume(self, chunks: list[str], fingerprint: str) -> list[ContextTurn]:
        """Stored chunks from the start up to the first gap; none when they came from another plan.

        Chunks made from other text, voice or settings must never be mixed into this chapter, so a changed
        plan wipes them first (the plan goes first: a kill halfway leaves no plan and the next run wipes
        the rest).
        """
        keys = set(self.storage.list(chunk_dir(self.book_id, self.chapter)))
        plan = plan_key(self.book_id, self.chapter)
        stored = json.loads(self.storage.read_text(plan)).get("fingerprint") if plan in keys else None
        if stored != fingerprint:
            for key in [plan, *sorted(keys - {plan})]:
                if key in keys:
                    self.storage.delete(key)
            self.storage.write_text(plan, json.dumps({"fingerprint": fingerprint, "chunks": chunks}))
            return []
        done = []
        self._markers = {key for key in keys if key.endswith(".cutoff")}
        for k, text in enumerate(chunks):
            npy, wav = self.key(k, "npy"), self.key(k, "wav")
            if npy not in keys or wav not in keys:
                break
            codes = np.load(io.BytesIO(self.storage.read_bytes(npy)), allow_pickle=False)
            done.append(ContextTurn(text, codes))
            if self.key(k, "cutoff") in self._markers:
                self.cut_off.add(k)
        return done

    def save(self, k: int, result: SynthesisResult) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(result.audio_codes), allow_pickle=False)
        # Float WAV: the chunk exactly as generated; mastering sets the level later.
        audio = io.BytesIO()
        sf.write(audio, result.waveform, result.sample_rate, format="WAV", subtype="FLOAT")
        # Audio first: resume requires both files, and the codes are what make a chunk count as done.
        self.storage.write_bytes(self.key(k, "wav"), audio.getvalue())
        marker = self.key(k, "cutoff")
        if result.finish_reason == "max_new_tokens":
            self.storage.write_text(marker, json.dumps({"generated_frames": result.generated_frames}))
            self.cut_off.add(k)
        elif marker in self._markers:  # an earlier try at this chunk, killed before its codes were stored
            self.storage.delete(marker)
        self.storage.write_bytes(self.key(k, "npy"), buffer.getvalue())

    def key(self, k: int, ext: str) -> str:
        return chunk_key(self.book_id, self.chapter, k, ext)


class ChapterStage:
    """One engine per actor; a batch of chapters goes through it together, each chapter chunk by chunk."""

    def __init__(self, settings: ChapterSettings, engine: Any = None) -> None:
        if engine is None:
            from model.engine import SynthesisEngine

            engine = SynthesisEngine.from_spec(settings.checkpoint, settings.engine)
        self.engine = engine
        self.settings = settings
        self.storage = Storage(settings.output, settings.storage_options)
        self.attempts = AttemptLog(self.storage)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = unpack(batch)
        texts: list[LongformText] = []
        owners: dict[str, tuple[int, ChunkStore, int]] = {}
        for i, row in enumerate(rows):
            if row["status"] != "pending":
                continue
            audio = row.pop("_audio", None)
            try:
                base = to_request({**row["request"], "text": "", "status": "pending"}, audio)
            except RequestError as exc:
                rows[i] = chapter_failed(row, exc.message, exc.field)
                continue
            store = ChunkStore(self.storage, row["book_id"], row["chapter"])
            done = store.resume(row["chunks"], self.fingerprint(row, audio))
            limit = self.settings.max_new_chunks
            todo = row["chunks"] if limit is None else row["chunks"][: len(done) + limit]
            key = f"{row['book_id']}#{row['chapter']}"
            texts.append(LongformText(key=key, base=base, chunks=todo, done=done))
            owners[key] = (i, store, len(done))

        def persist(text: LongformText, k: int, result: SynthesisResult) -> None:
            owners[text.key][1].save(k, result)

        self._render(texts, persist)
        for text in texts:
            i, store, resumed = owners[text.key]
            rows[i] = self._finished(rows[i], text, store, resumed)
        return pack(rows)

    def _render(self, texts: list[LongformText], persist) -> None:
        """Generate the chapters' missing chunks together, guarded against chapters that kill the actor
        (pipeline.attempts). A start is marked with the chunk each chapter starts from: chunks are stored
        as they come, so a start that got further is a new start from there."""

        def work(chapters: list[LongformText]) -> list[LongformText]:
            return generate_longform(self.engine, chapters, self.settings.buffer_size, on_chunk=persist)

        def abandon(text: LongformText, deaths: int) -> LongformText:
            text.error = (
                f"chunk {len(text.done)}: the synthesis worker died {deaths} times while rendering this "
                "chapter alone from here (a crash in the engine, the GPU or out of host memory); not "
                "retried in this run, run again to resume"
            )
            return text

        if texts:
            self.attempts.guard(texts, lambda t: f"{t.key}@{len(t.done)}", work, abandon)

    def _finished(self, row: dict, text: LongformText, store: ChunkStore, resumed: int) -> dict:
        total = len(row["chunks"])
        row = {k: v for k, v in row.items() if k not in ("chunks", "request")}
        row.update(n_chunks=total, chunks_resumed=resumed, chunks_generated=len(text.done) - resumed)
        row["chunks_cut_off"] = sorted(store.cut_off)
        where = f"chapter {row['chapter']} ({row['chapter_title']!r})"
        if text.error is not None:
            return chapter_failed(row, f"{where}: {text.error}", "synthesis")
        if len(text.done) < total:
            message = f"{where}: {len(text.done)} of {total} chunks rendered; run again to resume"
            return {**row, "status": "incomplete", "error": message, "error_field": "max_new_chunks"}
        return {**row, "status": "rendered"}

    def fingerprint(self, row: dict, audio: list | None) -> str:
        """What a chapter's chunks depend on: change any of it and the stored chunks no longer fit."""
        clips = [None if a is None else hashlib.sha256(_bytes(a)).hexdigest() for a in audio or []]
        plan = {
            "chunks": row["chunks"],
            "request": row["request"],
            "reference_audio": clips,
            "buffer_size": self.settings.buffer_size,
            # The weights, not the device or dtype: a run resumed on other hardware keeps its chunks.
            "checkpoint": [self.settings.checkpoint.source, self.settings.checkpoint.audio_tokenizer],
        }
        return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def chapter_failed(row: dict, message: str, field_name: str) -> dict:
    return {**row, "status": "error", "error": message, "error_field": field_name}


def _bytes(audio: Any) -> bytes:
    return audio if isinstance(audio, bytes) else np.ascontiguousarray(audio).tobytes()
