"""The dataset run: manifest -> validate -> fetch references -> synthesize -> write audio + metadata.

The driver only reads ids (for duplicates and resume) and small per-batch stats, so its memory does not grow
with the manifest; rows stream through Ray Data from reader to writer.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from model.options import CheckpointSpec, EngineOptions
from model.requests import RequestError
from pipeline.attempts import AttemptLog
from pipeline.lease import output_lease
from pipeline.manifest import ManifestRules, id_label
from pipeline.metadata import finished_ids, totals, write_audiofolder_index
from pipeline.reader import iter_ids, read_manifest
from pipeline.references import FetchPolicy
from pipeline.stages import (
    AUDIO_DIR,
    IO_THREADS,
    METADATA_DIR,
    FetchStage,
    SynthesisSettings,
    SynthesizeStage,
    ValidateStage,
    WriteSettings,
    WriteStage,
    metadata_record,
    metadata_table,
)
from pipeline.storage import Storage, StorageError

if TYPE_CHECKING:
    from ray.data import ActorPoolStrategy

log = logging.getLogger(__name__)
# Rows per block at least this many once a manifest is large: a Ray block costs scheduling, driver memory
# and one metadata part, which dominate below ~128 rows (scripts/bench_pipeline.py).
MIN_BLOCK_ROWS = 128
CALL_SLOTS = 4
# Rows per synthesis call when the engine sizes its batch from free GPU memory (batch_size 0): CALL_SLOTS x
# the most slots it takes (model.engine.fitting_batch_size's cap, which an 80 GB H100 reaches for ~10 s rows).
AUTO_CALL_ROWS = CALL_SLOTS * 256
# Synthesis calls a GPU actor takes at once: while one decodes, the next prepares, its rows' reference clips
# encoded on the GPU beside the decoding (model.engine: one call decodes at a time). A clip costs about as
# much GPU time as a short row's synthesis (docs/benchmarks.md), so a set whose rows each bring their own
# voice would otherwise leave the decoding idle for it: on an H100 (GPU run 8) 3 calls of 128 rows, each row
# its own 8 s clip, ran 1.16x faster two at a time (bench_encode_ahead.py). On a CPU both calls would share
# the same cores.
CALLS_PER_GPU_ACTOR = 2


@dataclass
class Resources:
    """How the graph is spread over the cluster."""

    actors: int = 1  # synthesis actors, each holding one engine
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    # Rows decoded together: the engine's KV slots; 0: the largest batch that fits the GPU's free memory for
    # each call's rows (model.engine.fitting_batch_size; 16 on a CPU).
    batch_size: int = 16
    # Rows per synthesis call; 0: CALL_SLOTS x batch_size (AUTO_CALL_ROWS for batch_size 0). Within a call,
    # waiting rows take the slots of rows that finish, so only a call's last rows leave slots idle: a call of
    # exactly batch_size rows of mixed lengths would spend its second half draining.
    rows_per_call: int = 0
    cpu_stage_workers: int = 1  # actors per CPU stage (validate, fetch, write)
    cpu_stage_cpus: float = 0.2  # validate, fetch, write and read are light; leave the cores to synthesis
    io_threads: int = IO_THREADS  # reads or writes each fetch or write actor keeps in flight

    @property
    def call_rows(self) -> int:
        return self.rows_per_call or (CALL_SLOTS * self.batch_size if self.batch_size else AUTO_CALL_ROWS)

    def layout(self, num_rows: int, pending: int) -> tuple[int, int]:
        """(rows per synthesis call, blocks the manifest is read in) for a manifest of `num_rows` rows, of
        which `pending` are to synthesise.

        Calls take call_rows rows, but no more than each actor's share of the pending rows: a 1,088-row
        evaluation set in calls of 1,024 would keep two of eight actors busy and leave six idle. Small
        blocks are kept through the CPU stages (a block per call), so batches spread over all actors and
        each block's audio and metadata part are written as soon as it is synthesised: a killed run loses
        at most the blocks in flight. Small manifests get one synthesis call per block; large ones
        MIN_BLOCK_ROWS rows, enough blocks still to keep every actor fed."""
        call = max(1, min(self.call_rows, math.ceil(pending / self.actors)))
        per_call = math.ceil(num_rows / call)
        return call, max(1, min(per_call, max(4 * self.actors, math.ceil(num_rows / MIN_BLOCK_ROWS))))

    def synthesis_compute(self) -> ActorPoolStrategy:
        """The synthesis actors' pool: `actors` of them, each taking CALLS_PER_GPU_ACTOR calls at once with a
        GPU and one without."""
        import ray

        calls = CALLS_PER_GPU_ACTOR if self.gpus_per_actor > 0 else 1
        return ray.data.ActorPoolStrategy(
            size=self.actors, max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1
        )


@dataclass
class DatasetJob:
    manifest: str
    output: str
    checkpoint: CheckpointSpec
    engine: EngineOptions = field(default_factory=EngineOptions)
    rules: ManifestRules = field(default_factory=ManifestRules)
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    resources: Resources = field(default_factory=Resources)
    storage_options: dict | None = None
    retry_errors: bool = False
    config_yaml: str | None = None  # the resolved config, secrets already redacted
    audio_key: str = AUDIO_DIR + "/{id}.{ext}"
    sample_rate: int | None = None  # output sample rate; None keeps the codec's 24 kHz
    # Object-store calls (driver and writers) are tried this many times, waiting backoff_s, 2x, 4x, ...
    # (at most 10 s) in between, before the run fails; local disks are tried once.
    storage_retries: int = 5
    storage_backoff_s: float = 0.2


def duplicate_ids(job: DatasetJob) -> tuple[dict[str, list[int]], Counter[str], list[str]]:
    """Ids that occur more than once in the manifest, with their 0-based row positions; how often each id
    occurs, as records name them (id_label); and every column any row has."""
    counts: Counter[str] = Counter()
    columns: dict[str, None] = {}
    for chunk in iter_ids(job.manifest, job.storage_options, columns=columns):
        counts.update(id_label(value) for value in chunk)
    duplicated = {k for k, n in counts.items() if n > 1}
    if not duplicated:
        return {}, counts, list(columns)
    positions: dict[str, list[int]] = {k: [] for k in duplicated}
    offset = 0
    for chunk in iter_ids(job.manifest, job.storage_options):
        for i, value in enumerate(chunk):
            key = id_label(value)
            if key in positions:
                positions[key].append(offset + i)
        offset += len(chunk)
    return positions, counts, list(columns)


def _write_duplicate_errors(
    storage: Storage, duplicates: dict[str, list[int]], finished: set[str], job
) -> int:
    """One metadata row per duplicated id: which row would be meant is ambiguous, so none is synthesised."""
    records = []
    for dup_id, rows in sorted(duplicates.items()):
        if dup_id in finished:
            continue
        exc = RequestError("id", f"duplicate id at manifest rows {rows}; ids must be unique", dup_id)
        row = {"id": dup_id, "status": "error", "error": exc.message, "error_field": "id"}
        records.append(metadata_record(row, job.checkpoint.source))
    if records:
        buffer = io.BytesIO()
        pq.write_table(metadata_table(records), buffer)
        storage.write_bytes(
            f"{METADATA_DIR}/part-duplicates-{uuid.uuid4().hex[:12]}.parquet", buffer.getvalue()
        )
    return len(records)


# How a StorageError raised in a stage reads once Ray has wrapped it in the worker's traceback.
_STORAGE_FAILURE = re.compile(
    r"^(?:\S+\.)?StorageError: (storage \w+ of (\S+) failed after (\d+) attempts?: .*)$", re.MULTILINE
)


def run_failure(exc: Exception) -> Exception:
    """What a failed run raises: the stage's StorageError itself when storage stopped it (Ray delivers it as
    text inside a worker traceback), else Ray's exception; either way without a driver-side traceback."""
    match = _STORAGE_FAILURE.search(str(exc))
    if match and not isinstance(exc, StorageError):
        return StorageError(match.group(1), match.group(2), int(match.group(3)))
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def run_dataset_job(job: DatasetJob) -> dict:
    """Run (or resume) one dataset job and return its summary, also written to <output>/summary.json.
    Raises OutputInUseError while another run is writing into the same output (pipeline.lease)."""
    storage = Storage(
        job.output, job.storage_options, retries=job.storage_retries, backoff_s=job.storage_backoff_s
    )
    with output_lease(storage):
        return _run(job, storage)


def _run(job: DatasetJob, storage: Storage) -> dict:
    started = time.time()
    if job.config_yaml is not None:
        storage.write_text("config.yaml", job.config_yaml)
    duplicates, ids, columns = duplicate_ids(job)
    finished = finished_ids(storage, retry_errors=job.retry_errors)
    attempts = AttemptLog(storage)
    attempts.clear()  # a killed run's count of starts is not this run's
    duplicate_errors = _write_duplicate_errors(storage, duplicates, finished, job)
    write = WriteSettings(
        job.output,
        job.storage_options,
        checkpoint=job.checkpoint.source,
        audio_key=job.audio_key,
        sample_rate=job.sample_rate,
        retries=job.storage_retries,
        backoff_s=job.storage_backoff_s,
        threads=job.resources.io_threads,
    )
    run_counts: Counter[str] = Counter({"error": duplicate_errors} if duplicate_errors else {})
    run_audio_s = 0.0
    # A rerun of a finished job starts no actor, and so loads no model.
    pending = len(ids.keys() - finished - duplicates.keys())
    if pending:
        synthesised, run_audio_s = _synthesise(
            job, write, finished, duplicates, ids.total(), pending, columns, attempts
        )
        run_counts.update(synthesised)
    wall = time.time() - started
    attempts.clear()
    output_totals, index_schema = totals(storage)

    summary = {
        "run_id": write.run_id,
        "manifest": job.manifest,
        "output": storage.uri_of_root(),
        "checkpoint": job.checkpoint.source,
        "skipped_as_finished": len(finished),
        "this_run": {
            "rows": sum(run_counts.values()),
            "by_status": dict(run_counts),
            "audio_seconds": round(run_audio_s, 3),
            "wall_seconds": round(wall, 3),
            "audio_seconds_per_second": round(run_audio_s / wall, 3) if wall > 0 else 0.0,
        },
        "output_totals": output_totals,
        "audiofolder_rows": write_audiofolder_index(storage, index_schema),
    }
    storage.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    # Every write of this run has finished; what is left in flight was left by a killed or failed run.
    leftovers = storage.clear_tmp()
    if leftovers:
        log.info("removed %d in-flight objects left by an earlier run", leftovers)
    return summary


def _synthesise(
    job: DatasetJob,
    write: WriteSettings,
    finished: set[str],
    duplicates: dict[str, list[int]],
    num_rows: int,
    pending: int,
    columns: list[str],
    attempts: AttemptLog,
) -> tuple[Counter[str], float]:
    """Run the manifest's rows that are neither finished nor duplicated through validation, fetching,
    synthesis and writing; returns the rows' statuses and seconds of audio."""
    import ray

    skip = ray.put(frozenset(finished) | frozenset(duplicates))
    res = job.resources
    cpu_stage = {
        "batch_format": "pyarrow",
        "batch_size": None,
        "compute": ray.data.ActorPoolStrategy(size=res.cpu_stage_workers),
        "num_cpus": res.cpu_stage_cpus,
    }

    call_rows, blocks = res.layout(num_rows, pending)
    ds = read_manifest(job.manifest, job.storage_options, num_cpus=res.cpu_stage_cpus, num_blocks=blocks)
    ds = ds.map_batches(
        ValidateStage,
        fn_constructor_kwargs={"rules": job.rules, "skip_ids": skip, "columns": columns},
        **cpu_stage,
    )
    fetch = {
        "policy": job.fetch,
        "max_seconds": job.engine.max_reference_seconds,
        "threads": res.io_threads,
    }
    ds = ds.map_batches(FetchStage, fn_constructor_kwargs=fetch, **cpu_stage)
    ds = ds.map_batches(
        SynthesizeStage,
        fn_constructor_kwargs={
            "settings": SynthesisSettings(job.checkpoint, job.engine, attempts, job.fetch)
        },
        batch_format="pyarrow",
        batch_size=call_rows,
        compute=res.synthesis_compute(),
        num_gpus=res.gpus_per_actor,
        num_cpus=res.cpus_per_actor,
    )
    ds = ds.map_batches(WriteStage, fn_constructor_kwargs={"settings": write}, **cpu_stage)

    run_counts: Counter[str] = Counter()
    run_audio_s = 0.0
    failure: Exception | None = None
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            run_counts.update(batch.column("status").to_pylist())
            run_audio_s += sum(batch.column("duration_s").to_pylist())
    except Exception as exc:  # noqa: BLE001 - re-raised below, once the run's actors are let go
        failure = run_failure(exc)
    if failure is not None:
        # Ray stops an actor once no handle to it is left, and a failed execution is only shut down
        # gently: the traceback's frames would keep its actors (and the writes queued on them) alive,
        # still writing into the output under a rerun. Drop every reference before raising.
        del ds
        gc.collect()
        raise failure
    return run_counts, run_audio_s
