"""The audiobook run: books manifest -> chapters -> chunks -> mastered MP3s -> one M4B per book.

read books -> BookStage (CPU: check, parse, chunk; one row per chapter)
           -> ChapterStage (one engine per actor: chapters together, every chunk persisted)
           -> MasterStage (CPU: stitch, master to ACX, MP3, QC on the MP3)
           -> driver: per book, once all its chapters are in, a Ray task builds the M4B and qc.csv

The driver only ever holds chapter keys and QC numbers. A book is finished when its metadata row says ok;
anything else runs again, and its chapters pick up from their stored chunks.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.options import CheckpointSpec, EngineOptions
from pipeline.attempts import AttemptLog
from pipeline.book_layout import m4b_key, qc_key
from pipeline.book_metadata import (
    book_record,
    book_totals,
    latest_book_records,
    qc_csv,
    write_book_records,
)
from pipeline.book_stage import BookSettings, BookStage
from pipeline.chapter_stage import ChapterSettings, ChapterStage
from pipeline.dataset_job import Resources
from pipeline.export import FFmpegError, build_m4b, probe
from pipeline.lease import output_lease
from pipeline.manifest import canonical_id
from pipeline.master_stage import Mastering, MasterSettings, MasterStage
from pipeline.reader import iter_ids, read_manifest
from pipeline.stages import unpack
from pipeline.storage import Storage

log = logging.getLogger(__name__)
# Chapters together per actor when the engine sizes its batch from free GPU memory (batch_size 0): the
# most slots it takes (model.engine.fitting_batch_size's cap). Each chapter has one chunk in the call at a
# time; where fewer slots fit, waiting chunks take the slots of those that finish.
AUTO_CHAPTERS = 256


@dataclass
class AudiobookJob:
    books: str  # manifest URI
    output: str
    checkpoint: CheckpointSpec
    book: BookSettings  # its output/storage_options are filled in from the job
    engine: EngineOptions = field(default_factory=EngineOptions)
    mastering: Mastering = field(default_factory=Mastering)
    resources: Resources = field(default_factory=Resources)
    buffer_size: int | None = 2
    max_new_chunks: int | None = None
    storage_options: dict | None = None
    config_yaml: str | None = None  # the resolved config, secrets already redacted


# Resampling, limiting and two ffmpeg runs per chapter keep a core busy; asking for less would let several
# masterings crowd the core the synthesis actor needs on a CPU-only machine.
MASTER_CPUS = 1.0


def run_stage(batch: Any, stage: type, **kwargs: Any) -> Any:
    """A CPU stage as a Ray task: the stage is cheap to build, so it is built per call."""
    return stage(**kwargs)(batch)


def _warn_if_no_spare_cpu(res: Resources) -> None:
    import ray

    spare = ray.cluster_resources().get("CPU", 0.0) - res.actors * res.cpus_per_actor
    if spare < 1:
        log.warning(
            "only %.1f CPUs are left beside %d synthesis actors x %.1f CPUs; the CPU stages need at least "
            "one whole CPU and the run will wait until the cluster has one",
            spare,
            res.actors,
            res.cpus_per_actor,
        )


def book_id_rows(job: AudiobookJob) -> tuple[dict[str, list[int]], bool]:
    """Each valid book_id's 0-based manifest rows, and whether some row's book_id is not valid."""
    positions: dict[str, list[int]] = {}
    odd = False
    offset = 0
    for chunk in iter_ids(job.books, job.storage_options, column="book_id"):
        for i, value in enumerate(chunk):
            book_id = canonical_id(value)
            if book_id is not None:
                positions.setdefault(book_id, []).append(offset + i)
            else:
                odd = True
        offset += len(chunk)
    return positions, odd


def run_audiobook_job(job: AudiobookJob) -> dict:
    """Run (or resume) one audiobook job; returns its summary, also written to <output>/summary.json.
    Raises OutputInUseError while another run is writing into the same output (pipeline.lease)."""
    storage = Storage(job.output, job.storage_options)
    with output_lease(storage):
        return _run(job, storage)


def _run(job: AudiobookJob, storage: Storage) -> dict:
    import ray

    started = time.time()
    run_id = uuid.uuid4().hex[:12]
    if job.config_yaml is not None:
        storage.write_text("config.yaml", job.config_yaml)
    finished = {b for b, r in latest_book_records(storage).items() if r["status"] == "ok"}
    attempts = AttemptLog(storage)
    attempts.clear()  # a killed run's count of starts is not this run's
    positions, odd_ids = book_id_rows(job)
    duplicates = {k: rows for k, rows in positions.items() if len(rows) > 1 and k not in finished}
    res = job.resources
    book = BookSettings(**{**vars(job.book), "output": job.output, "storage_options": job.storage_options})
    chapter = ChapterSettings(
        output=job.output,
        checkpoint=job.checkpoint,
        engine=job.engine,
        storage_options=job.storage_options,
        buffer_size=job.buffer_size,
        max_new_chunks=job.max_new_chunks,
    )
    master = MasterSettings(job.output, job.storage_options, job.mastering)
    _warn_if_no_spare_cpu(res)

    # An actor or task works through a whole block, so block sizes decide how far work spreads: one book
    # per block into BookStage, one engine batch of chapters per block into ChapterStage, one chapter per
    # block into MasterStage. Re-blocking runs as 1-CPU tasks, which is why the CPU stages are tasks rather
    # than actor pools: actors would hold their CPUs for the whole run and, on a small machine, leave no
    # whole CPU for re-blocking, and the run would stall.
    ds = read_manifest(job.books, job.storage_options, num_cpus=res.cpu_stage_cpus)
    ds = ds.repartition(target_num_rows_per_block=1)
    skip = ray.put(frozenset(finished) | frozenset(duplicates))
    ds = ds.map_batches(
        run_stage,
        fn_kwargs={"stage": BookStage, "settings": book, "skip_ids": skip},
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=res.cpu_stage_cpus,
    )
    chapters = res.batch_size or AUTO_CHAPTERS
    ds = ds.repartition(target_num_rows_per_block=chapters)
    ds = ds.map_batches(
        ChapterStage,
        fn_constructor_kwargs={"settings": chapter},
        batch_format="pyarrow",
        batch_size=chapters,  # chapters an engine renders together
        # A batch keeps an engine busy for long; queueing a second one on the same actor would leave
        # another actor idle while there is work.
        compute=ray.data.ActorPoolStrategy(size=res.actors, max_tasks_in_flight_per_actor=1),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
    )
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(
        run_stage,
        fn_kwargs={"stage": MasterStage, "settings": master},
        batch_format="pyarrow",
        batch_size=1,
        num_cpus=MASTER_CPUS,
    )

    collector = BookCollector(storage, run_id, job.mastering, MASTER_CPUS)
    for book_id, rows in sorted(duplicates.items()):
        message = f"book_id (value {book_id!r}): duplicate at manifest rows {rows}; book ids must be unique"
        collector.record(
            book_record(run_id, book_id=book_id, status="error", error=message, error_field="book_id")
        )
    # A rerun of a finished job should not start (and load models into) a single actor.
    if odd_ids or set(positions) - finished - set(duplicates):
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in unpack(batch):
                collector.add(row)
            collector.flush(wait=False)
    collector.flush(wait=True)
    attempts.clear()
    wall = time.time() - started

    this_run = collector.stats
    summary = {
        "run_id": run_id,
        "books": job.books,
        "output": storage.uri_of_root(),
        "checkpoint": job.checkpoint.source,
        "buffer_size": job.buffer_size,
        "skipped_as_finished": len(finished & set(positions)),
        "this_run": {
            "books": sum(this_run["by_status"].values()),
            "by_status": dict(this_run["by_status"]),
            "chapters": this_run["chapters"],
            "chunks_generated": this_run["chunks_generated"],
            "chunks_resumed": this_run["chunks_resumed"],
            "chunks_cut_off": this_run["chunks_cut_off"],
            "audio_seconds": round(this_run["audio_seconds"], 3),
            "wall_seconds": round(wall, 3),
        },
        "output_totals": book_totals(latest_book_records(storage)),
    }
    storage.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    storage.clear_tmp()  # every write of this run has finished: what is left in flight, a killed run left
    return summary


class BookCollector:
    """Gathers chapter rows per book on the driver and turns each complete book into its record."""

    def __init__(self, storage: Storage, run_id: str, mastering: Mastering, num_cpus: float) -> None:
        self.storage = storage
        self.run_id = run_id
        self.mastering = mastering
        self.num_cpus = num_cpus
        self.chapters: dict[str, dict[int, dict]] = {}
        self.pending: list[Any] = []  # ObjectRefs of M4B assemblies
        self.assemble: Any = None  # the Ray task, made once
        self.records: list[dict] = []
        self.stats: dict[str, Any] = {
            "by_status": Counter(),
            "chapters": 0,
            "chunks_generated": 0,
            "chunks_resumed": 0,
            "chunks_cut_off": 0,  # in the chapters this run finished, whichever run generated them
            "audio_seconds": 0.0,
        }

    def add(self, row: dict) -> None:
        if row["kind"] == "book":  # failed before it had chapters
            self.record(book_record(self.run_id, **row))
            return
        self.stats["chapters"] += 1
        self.stats["chunks_generated"] += row.get("chunks_generated", 0)
        self.stats["chunks_resumed"] += row.get("chunks_resumed", 0)
        self.stats["chunks_cut_off"] += len(row.get("chunks_cut_off", []))
        chapters = self.chapters.setdefault(row["book_id"], {})
        chapters[row["chapter"]] = row
        if len(chapters) == row["chapters"]:
            self._complete([chapters[n] for n in sorted(self.chapters.pop(row["book_id"]))])

    def _complete(self, chapters: list[dict]) -> None:
        first = chapters[0]
        generated = sum(c.get("chunks_generated", 0) for c in chapters)
        cut_off = {c["chapter"]: c["chunks_cut_off"] for c in chapters if c.get("chunks_cut_off")}
        if cut_off:
            log.warning(
                "book %r: max_new_tokens cut off chunks %s (chapter: chunks; qc.csv lists them)",
                first["book_id"],
                cut_off,
            )
        bad = [c for c in chapters if c["status"] != "ok"]
        if bad:
            # An error anywhere fails the book; otherwise it is only unfinished and resumes next run.
            status = "error" if any(c["status"] == "error" for c in bad) else "incomplete"
            worst = next(c for c in bad if c["status"] == status)
            message = "; ".join(c["error"] for c in bad if c["status"] == status)
            fields = {**first, "status": status, "error": message, "error_field": worst["error_field"]}
            counts = {"chunks_generated": generated, "chunks_cut_off": _cut_off(chapters)}
            self.record(book_record(self.run_id, **{**fields, **counts}))
            return
        if self.assemble is None:
            import ray

            self.assemble = ray.remote(assemble_book).options(num_cpus=self.num_cpus)
        where = (self.storage.uri_of_root(), self.storage.storage_options)
        self.pending.append(self.assemble.remote(where, self.run_id, self.mastering, chapters, generated))

    def flush(self, wait: bool) -> None:
        """Collect finished assemblies and append every record so far to a new metadata part."""
        import ray

        if self.pending:
            ready, self.pending = ray.wait(
                self.pending, num_returns=len(self.pending), timeout=None if wait else 0
            )
            for record in ray.get(ready):
                self.record(record)
        write_book_records(self.storage, self.records, self.run_id)
        self.records = []

    def record(self, record: dict) -> None:
        self.stats["by_status"][record["status"]] += 1
        if record["status"] == "ok":
            self.stats["audio_seconds"] += record["duration_s"] or 0.0
        self.records.append(record)


def _cut_off(chapters: list[dict]) -> int:
    return sum(len(c.get("chunks_cut_off", [])) for c in chapters)


def assemble_book(
    where: tuple[str, dict | None], run_id: str, mastering: Mastering, chapters: list[dict], generated: int
) -> dict:
    """The M4B (chapter marks from the titles, tags, cover) and qc.csv of a book whose chapters are done.

    `where` is the output's (URI, storage options): a Storage is built here rather than shipped over.
    """
    storage = Storage(*where)
    first = chapters[0]
    book_id = first["book_id"]
    fields = {k: first.get(k) for k in ("book_id", "title", "author", "language")}
    fields.update(chapters=len(chapters), chunks_generated=generated, chunks_cut_off=_cut_off(chapters))
    storage.write_text(qc_key(book_id), qc_csv(chapters))
    qc_passed = all(c["qc"]["passed"] for c in chapters)
    try:
        with tempfile.TemporaryDirectory(prefix="book-") as tmp:
            files = []
            for chapter in chapters:
                path = Path(tmp) / os.path.basename(chapter["mp3_key"])
                path.write_bytes(storage.read_bytes(chapter["mp3_key"]))
                files.append(path)
            cover = storage.read_bytes(first["cover_key"]) if first.get("cover_key") else None
            out = build_m4b(
                files,
                [c["chapter_title"] for c in chapters],
                Path(tmp) / f"{book_id}.m4b",
                title=first["title"],
                author=first["author"],
                cover=cover,
                cover_mime=first.get("cover_mime") if cover else None,
                bitrate_kbps=mastering.m4b_bitrate_kbps,
            )
            duration = probe(out)["duration_s"]
            storage.write_bytes(m4b_key(book_id), out.read_bytes())
    except (FFmpegError, ValueError, OSError) as exc:
        message = f"assembling the M4B failed: {exc}"
        return book_record(run_id, **fields, status="error", error=message, error_field="m4b")
    return book_record(
        run_id,
        **fields,
        status="ok",
        duration_s=duration,
        m4b_uri=storage.uri(m4b_key(book_id)),
        qc_uri=storage.uri(qc_key(book_id)),
        qc_passed=qc_passed,
    )
