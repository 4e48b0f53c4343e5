"""Scores for a regenerated eval set: a Ray Data pass over the ok rows after synthesis.

The manifest is read again and validated, so each row's prompt comes out exactly as synthesis saw it (a
library voice, a relative Seed-TTS prompt, an explicit reference); only ids that are ok in the metadata are
scored. Per-row scores go to ``<output>/scores/*.parquet``; the dataset metadata is left as it is. Every run
scores every ok row of the output again (resumed ones too), so old score parts are removed first.
"""

from __future__ import annotations

import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from model.requests import RequestError
from pipeline.dataset_job import DatasetJob
from pipeline.json_lines import manifest_rows
from pipeline.manifest import ManifestRules, validate_row
from pipeline.metadata import metadata_parts
from pipeline.reader import read_manifest
from pipeline.references import FetchPolicy, fetch_reference
from pipeline.scoring import DEFAULT_ASR_MODEL, DEFAULT_SV_MODEL, aggregate
from pipeline.stages import IO_THREADS, pack, unpack
from pipeline.storage import Storage, StorageError

SCORES_DIR = "scores"
SCORE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("wer", pa.float64()),
    pa.field("sim", pa.float64()),
    pa.field("hypothesis", pa.string()),
    pa.field("category", pa.string()),
    pa.field("language", pa.string()),
    pa.field("text", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("asr_truncated", pa.bool_()),
    pa.field("error", pa.string()),
]
SCORE_SCHEMA = pa.schema(SCORE_FIELDS)


@dataclass
class ScoringOptions:
    enabled: bool = False
    asr_model: str = DEFAULT_ASR_MODEL  # hub id or local folder
    sv_model: str = DEFAULT_SV_MODEL
    language: str | None = None  # for rows that carry none (Scorer falls back to English)
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 8  # rows per scorer call
    device: str | None = None  # None: cuda when the actor sees a GPU


@dataclass
class InputSettings:
    output: str
    storage_options: dict | None
    rules: ManifestRules
    fetch: FetchPolicy
    ok_files: Any  # ObjectRef of {id: file_name} for the ok rows
    language: str | None = None
    threads: int = IO_THREADS  # rows whose audio and prompt are read at once (runtime.io_threads)


@dataclass
class ScoreSettings:
    options: ScoringOptions
    output: str
    storage_options: dict | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class ScoreInputStage:
    """Manifest rows -> (text, output audio bytes, prompt audio bytes) for the ok ids (CPU, I/O)."""

    def __init__(self, settings: InputSettings) -> None:
        import ray

        self.settings = settings
        self.ok = ray.get(settings.ok_files)
        self.pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="score-input")
        self.storage = Storage(settings.output, settings.storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for raw in manifest_rows(batch):  # a JSONL manifest (eval_set=manifest) arrives as raw lines
            row = validate_row(raw, self.settings.rules)
            if row["status"] != "pending" or row["id"] not in self.ok:
                continue
            rows.append(row)
        # Each row reads its output audio and its prompt, round trips to object storage that many rows wait
        # on at once, as the dataset job's fetch stage does.
        return pack(list(self.pool.map(self._load, rows)))

    def _load(self, row: dict) -> dict:
        category = row.get("category")
        item = {
            "id": row["id"],
            "status": "pending",
            "text": row["text"],
            "language": row.get("language") or self.settings.language,
            "category": None if category is None else str(category),
            "error": None,
        }
        try:
            item["audio"] = self.storage.read_bytes(self.ok[row["id"]])
        except (StorageError, OSError) as exc:
            item["error"] = f"output audio: {exc}"
        refs = row.get("references") or []
        # SIM compares one speaker with one prompt; several voices (dialogue) or a text profile have none.
        if len(refs) == 1 and refs[0].get("audio"):
            try:
                item["reference_audio"] = fetch_reference(
                    refs[0]["audio"], self.settings.fetch, "references[0].audio"
                )
            except RequestError as exc:
                item["error"] = f"{exc.field}: {exc.message}"
        return item


class ScoreStage:
    """One Scorer (Whisper + WavLM) per actor; writes a score part per batch and returns the rows."""

    def __init__(self, settings: ScoreSettings) -> None:
        from pipeline.scoring import Scorer

        opts = settings.options
        self.scorer = Scorer(opts.asr_model, opts.sv_model, device=opts.device, batch_size=opts.batch_size)
        self.settings = settings
        self.storage = Storage(settings.output, settings.storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = unpack(batch)
        if not rows:
            return SCORE_SCHEMA.empty_table()
        # A row whose audio could not be read still gets a result row, so every ok id shows up in scores/.
        results = self.scorer.score(rows)
        for row, result in zip(rows, results, strict=True):
            result["error"] = "; ".join(e for e in (row.get("error"), result["error"]) if e) or None
        table = pa.table({f.name: pa.array([r.get(f.name) for r in results], f.type) for f in SCORE_FIELDS})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        name = f"{SCORES_DIR}/part-{self.settings.run_id}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        self.storage.write_bytes(name, buffer.getvalue())
        return table


def run_scoring(job: DatasetJob, options: ScoringOptions) -> dict:
    """Score every ok row of ``job`` (after it has run); returns the aggregates for summary.json."""
    import ray

    storage = Storage(job.output, job.storage_options)
    for key in storage.list(SCORES_DIR):
        if key.endswith(".parquet"):
            storage.delete(key)
    ok_files = _ok_files(storage)
    scored: list[dict] = []
    if ok_files:
        res = job.resources
        inputs = InputSettings(
            job.output,
            job.storage_options,
            job.rules,
            job.fetch,
            ray.put(ok_files),
            language=options.language,
            threads=res.io_threads,
        )
        ds = read_manifest(job.manifest, job.storage_options, num_cpus=res.cpu_stage_cpus)
        ds = ds.map_batches(
            ScoreInputStage,
            fn_constructor_kwargs={"settings": inputs},
            batch_format="pyarrow",
            batch_size=None,  # a block per call, as the dataset job's CPU stages take them
            compute=ray.data.ActorPoolStrategy(size=res.cpu_stage_workers),
            num_cpus=res.cpu_stage_cpus,
        )
        ds = ds.map_batches(
            ScoreStage,
            fn_constructor_kwargs={"settings": ScoreSettings(options, job.output, job.storage_options)},
            batch_format="pyarrow",
            batch_size=options.batch_size,
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            num_gpus=options.gpus_per_actor,
            num_cpus=options.cpus_per_actor,
        )
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            scored.extend(batch.select(["id", "wer", "sim", "category", "error"]).to_pylist())
    scored.sort(key=lambda r: r["id"])
    return {
        "asr_model": options.asr_model,
        "sv_model": options.sv_model,
        "files": storage.uri(SCORES_DIR),
        **aggregate(scored),
    }


def format_scores(scores: dict) -> str:
    """A small text table: WER and SIM overall and per category."""
    lines = [f"{'':<24} {'rows':>5} {'WER':>8} {'SIM':>8} {'errors':>7}"]

    def line(name: str, means: dict) -> str:
        wer = "-" if means["wer"] is None else f"{means['wer']:.4f}"
        sim = "-" if means["sim"] is None else f"{means['sim']:.4f}"
        return f"{name[:24]:<24} {means['count']:>5} {wer:>8} {sim:>8} {means['errors']:>7}"

    lines.append(line("all", scores))
    for name, means in (scores.get("groups") or {}).items():
        lines.append(line(name, means))
    return "\n".join(lines)


def _ok_files(storage: Storage) -> dict[str, str]:
    ok: dict[str, str] = {}
    for _, contents in storage.read_each(metadata_parts(storage)):
        table = pq.read_table(io.BytesIO(contents), columns=["id", "status", "file_name"])
        for row in table.to_pylist():
            if row["status"] == "ok" and row["file_name"]:
                ok[row["id"]] = row["file_name"]
    return ok
