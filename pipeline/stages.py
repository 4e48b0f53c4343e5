"""The Ray Data stages of a synthesis run, one callable class each.

Between stages a row travels as three columns: `id`, `status` and `payload`, the pickled canonical row
(passthrough columns, decoded reference clips, the synthesis result). Arrow would otherwise have to agree on
one schema for every user's passthrough columns in every block.
"""

from __future__ import annotations

import io
import json
import pickle
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from model.lru import LRUCache
from model.requests import CODEC_SAMPLE_RATE, DecodedClip, KnownClip, RequestError, SynthesisResult
from pipeline.attempts import AttemptLog
from pipeline.json_lines import manifest_rows
from pipeline.manifest import ManifestRules, passthrough_columns, recorded_id, to_request, validate_row
from pipeline.references import FetchPolicy, fetch_reference, shown_source
from pipeline.storage import READ_AHEAD, Storage

AUDIO_DIR = "audio"
METADATA_DIR = "metadata"
# Clips a fetch actor remembers having sent decoded (see FetchStage).
SEEN_CLIPS = 4096
# The reads or writes a CPU-stage actor keeps in flight (FetchStage, WriteStage): as many as the driver's
# reads, for the same reason (object storage answers each in tens of ms).
IO_THREADS = READ_AHEAD
TIMING_FIELDS = ("reference_encode_s", "prefill_s", "decode_s", "vocode_s")
METADATA_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("error_field", pa.string()),
    pa.field("file_name", pa.string()),
    pa.field("audio_uri", pa.string()),
    pa.field("format", pa.string()),
    pa.field("sample_rate", pa.int32()),
    pa.field("duration_s", pa.float64()),
    pa.field("num_audio_frames", pa.int64()),
    pa.field("finish_reason", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("checkpoint", pa.string()),
    pa.field("text", pa.string()),
    pa.field("timings", pa.struct([pa.field(name, pa.float64()) for name in TIMING_FIELDS])),
]
METADATA_COLUMNS = [f.name for f in METADATA_FIELDS]
# Canonical request columns that stay in the payload and are not repeated in the metadata.
_REQUEST_ONLY = {
    "references",
    "system_prompt",
    "scene_prompt",
    "speaker_tag",
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "ras_win_len",
    "ras_win_max_num_repeat",
    "response_format",
    "_audio",
    "_result",
}


def pack(rows: list[dict]) -> pa.Table:
    # The payloads joined into one buffer and handed to Arrow as it is: pa.array over a list of ~0.5 MB
    # pickles (rows with their audio) took 1.8-3 s for 1,024 rows without letting go of the GIL, which stalls
    # the decode loop of the call beside it on a GPU actor (scripts/bench_payload.py). 64-bit offsets: a
    # call's audio may pass 2 GB.
    payloads = [pickle.dumps(r, protocol=5) for r in rows]
    offsets = np.zeros(len(payloads) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in payloads], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(payloads))]
    return pa.table(
        {
            "id": pa.array([str(r.get("id")) for r in rows], pa.string()),
            "status": pa.array([r["status"] for r in rows], pa.string()),
            "payload": pa.Array.from_buffers(pa.large_binary(), len(payloads), buffers),
        }
    )


def unpack(batch: pa.Table) -> list[dict]:
    rows = []
    for chunk in batch.column("payload").chunks:
        if not len(chunk):
            continue
        # Each payload read in place from the block's buffer, not copied out into bytes first.
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = memoryview(data_buffer)
        rows.extend(
            pickle.loads(data[start:end]) for start, end in zip(offsets[:-1], offsets[1:], strict=True)
        )
    return rows


def fail(row: dict, exc: RequestError) -> dict:
    return {**row, "status": "error", "error": exc.message, "error_field": exc.field}


class ValidateStage:
    """Manifest rows -> canonical rows; ids already finished in the output and duplicated ids drop out.

    Every row gets each of the manifest's passthrough `columns` (None where it has no value), as Arrow gives
    every row of a table every column: JSONL rows name their own keys, and the metadata parts, and the
    AudioFolder index written from them, should not depend on which rows a part holds."""

    def __init__(self, rules: ManifestRules, skip_ids: Any = None, columns: Sequence[str] = ()) -> None:
        import ray

        self.rules = rules
        self.skip = ray.get(skip_ids) if isinstance(skip_ids, ray.ObjectRef) else (skip_ids or frozenset())
        self.passthrough = passthrough_columns(columns)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for raw in manifest_rows(batch):
            if recorded_id(raw) in self.skip:
                continue
            row = validate_row(raw, self.rules)
            for name in self.passthrough:
                row.setdefault(name, None)
            rows.append(row)
        return pack(rows)


class FetchStage:
    """Reference audio sources -> the clips to voice rows with; a source that cannot be read or decoded
    errors its row, naming the reference.

    A block's distinct sources are read `threads` at a time: reading one is mostly waiting on object storage
    or a web server, and one at a time a fetch actor fed 40 rows a second of an eval set whose rows each name
    their own clip, at 20 ms a request, against ~75 rows of ~4 s that a GPU at 300x real time voices; 16 at a
    time, 218-238 (scripts/bench_io.py). A source several rows of a block name is read once.

    The first time a fetch actor meets a clip it decodes and resamples it to the codec's rate here, in a CPU
    actor beside the GPU ones: that takes 2-4 ms for a 10 s clip at 16 or 48 kHz
    (scripts/bench_references.py), which a synthesis actor spent with its GPU idle for every distinct clip of
    an eval set. Later rows with the same clip (a voice library) carry only its content hash
    (model.requests.KnownClip): the synthesis actor finds the clip's codes in its cache by it, and one that
    has not met the clip reads and encodes it once (SynthesizeStage)."""

    def __init__(self, policy: FetchPolicy, max_seconds: float, threads: int = IO_THREADS) -> None:
        self.policy = policy
        self.max_seconds = max_seconds
        self.decoded = LRUCache(SEEN_CLIPS)  # content hashes of the clips sent decoded
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="fetch")

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = unpack(batch)
        read = self._read_all(
            {
                ref["audio"]
                for row in rows
                if row["status"] == "pending"
                for ref in row.get("references") or []
                if isinstance(ref.get("audio"), str)
            }
        )
        hashes: dict[str, str] = {}  # by location: a block's rows of one voice share its clip
        for i, row in enumerate(rows):
            if row["status"] != "pending":
                continue
            audio = []
            try:
                for j, ref in enumerate(row.get("references") or []):
                    source = ref.get("audio")
                    field_name = f"references[{j}].audio"
                    if source is None:
                        audio.append(None)
                    elif isinstance(source, str) and source in hashes:
                        audio.append(KnownClip(hashes[source]))
                    else:
                        clip = self._clip(read, source, field_name)
                        if isinstance(source, str):
                            hashes[source] = clip.source_hash
                        audio.append(clip)
            except RequestError as exc:
                rows[i] = fail(row, exc)
                continue
            row["_audio"] = audio
        return pack(rows)

    def _read_all(self, sources: set[str]) -> dict[str, bytes | RequestError]:
        """Each location's bytes, or the error reading it gave (its field is the caller's to name)."""
        locations = list(sources)
        return dict(zip(locations, self.pool.map(self._read, locations), strict=True))

    def _read(self, source: str) -> bytes | RequestError:
        try:
            return fetch_reference(source, self.policy)
        except RequestError as exc:
            return exc

    def _clip(self, read: dict, source: Any, field_name: str) -> KnownClip | DecodedClip:
        # Imported here: the driver imports this module, and model.reference_audio brings torch.
        from model.reference_audio import content_hash, decode_reference

        # Bytes in the manifest need no reading, and fetch_reference refuses what is neither bytes nor text.
        data = read[source] if isinstance(source, str) else fetch_reference(source, self.policy, field_name)
        if isinstance(data, RequestError):
            raise RequestError(field_name, data.reason, data.value)
        key = content_hash(data)
        if self.decoded.get(key):
            return KnownClip(key)
        samples = decode_reference(data, CODEC_SAMPLE_RATE, max_seconds=self.max_seconds, field=field_name)
        self.decoded.put(key, True)
        return DecodedClip(samples, CODEC_SAMPLE_RATE, key)


@dataclass
class SynthesisSettings:
    checkpoint: Any  # model.checkpoint.CheckpointSpec
    engine: Any  # model.engine.EngineOptions
    # Where calls count their starts: the run's, under its output (pipeline.attempts); None: not counted.
    attempts: AttemptLog | None = None
    # How a clip the actor has not met is read again when its row carries only the clip's hash (KnownClip):
    # the fetch stage's policy.
    fetch: FetchPolicy = field(default_factory=FetchPolicy)


class SynthesizeStage:
    """One engine per actor: the model and its audio tokenizer load once, then serve batch after batch.
    Rows that keep killing the actor stop being retried (pipeline.attempts)."""

    def __init__(self, settings: SynthesisSettings) -> None:
        from model.engine import SynthesisEngine

        self.engine = SynthesisEngine.from_spec(settings.checkpoint, settings.engine)
        self.checkpoint_name = settings.checkpoint.source
        self.attempts = settings.attempts
        self.fetch = settings.fetch

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = unpack(batch)
        todo, requests = [], []
        # The clips this call's rows bring decoded, by content hash: a row carrying only a clip's hash takes it
        # from them, wherever in the call it lies (blocks from the fetch actors come in any order).
        met = {
            clip.source_hash: clip
            for row in rows
            if row["status"] == "pending"
            for clip in row.get("_audio") or ()
            if isinstance(clip, DecodedClip)
        }
        for i, row in enumerate(rows):
            if row["status"] != "pending":
                continue
            try:
                requests.append(to_request(row, self._known(row, row.pop("_audio", None), met)))
                todo.append(i)
            except RequestError as exc:
                rows[i] = fail(row, exc)
        for i, result in zip(todo, self._generate(requests), strict=True):
            row = rows[i]
            row["checkpoint"] = self.checkpoint_name
            if result.ok:
                row["_result"] = result
            else:
                field_name, message = result.error_field or "synthesis", result.error or "failed"
                # A request error the engine found already reads "<field> (value ...): <reason>".
                if not message.startswith(field_name):
                    message = f"{field_name}: {message}"
                rows[i] = {**row, "status": "error", "error": message, "error_field": field_name}
        return pack(rows)

    def _known(self, row: dict, audio: list | None, met: dict[str, Any]) -> list | None:
        """The row's clips, each KnownClip given its codes from the engine's cache, or else the clip as a row
        of this call brought it (`met`, by content hash: the engine encodes it once, for the first row that
        needs it), or else, for a clip this actor has not met or no longer holds, its source's bytes read
        again (and kept in `met` for the call's other rows)."""
        if audio is None:
            return None
        out = list(audio)
        for j, clip in enumerate(out):
            if not isinstance(clip, KnownClip):
                continue
            codes = self.engine.reference_cache.get(clip.source_hash)
            if codes is not None:
                out[j] = KnownClip(clip.source_hash, codes)
            elif clip.source_hash in met:
                out[j] = met[clip.source_hash]
            else:
                out[j] = met[clip.source_hash] = self._read_again(row["references"][j]["audio"], clip, j)
        return out

    def _read_again(self, source: str | bytes, clip: KnownClip, j: int) -> bytes:
        """The clip's bytes from its source, refused if they are no longer the bytes the fetch stage hashed:
        this row would be voiced from another clip than the other rows of its voice."""
        from model.reference_audio import content_hash

        field_name = f"references[{j}].audio"
        data = fetch_reference(source, self.fetch, field_name)
        if content_hash(data) != clip.source_hash:
            raise RequestError(
                field_name,
                "changed after this run first read it (its content hash differs), and the other rows of "
                "this voice are voiced from the clip as it was; leave reference files unchanged while a run "
                "reads them, and rerun with retry_errors=true to voice this row from the file as it is now",
                shown_source(source),
            )
        return data

    def _generate(self, requests: list) -> list[SynthesisResult]:
        """The engine's results for `requests`, guarded against rows that kill the actor (pipeline.attempts)."""
        if self.attempts is None or not requests:
            return self.engine.generate(requests)
        return self.attempts.guard(requests, lambda r: r.id, self.engine.generate, self._abandoned)

    @staticmethod
    def _abandoned(request, deaths: int) -> SynthesisResult:
        return SynthesisResult(
            id=request.id,
            error_field="synthesis",
            error=(
                f"synthesis: the synthesis worker died {deaths} times while generating this row alone "
                "(a crash in the engine, the GPU or out of host memory); not retried in this run, "
                "retry_errors=true runs it again"
            ),
        )


@dataclass
class WriteSettings:
    output: str
    storage_options: dict | None = None
    checkpoint: str = ""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Where a row's audio goes, relative to the output; evaluation sets put "{id}.wav" at the root.
    audio_key: str = AUDIO_DIR + "/{id}.{ext}"
    sample_rate: int | None = None  # resample before encoding (e.g. 16000 for scorers); None keeps 24 kHz
    retries: int = 5  # attempts per object-store call (see pipeline.storage.Storage)
    backoff_s: float = 0.2
    threads: int = IO_THREADS  # rows encoded and stored at once (runtime.io_threads)


class WriteStage:
    """Encode and store each row's audio, then one metadata Parquet part for the batch; emits run stats.

    Rows are stored `threads` at a time: an upload to object storage is mostly waiting for its answer. One
    at a time, a write actor stored 30 rows a second at 20 ms a request (8 when a file took four requests,
    pipeline.storage), where a GPU at 300x real time voices ~75 rows of ~4 s; 16 at a time, 112
    (scripts/bench_io.py)."""

    def __init__(self, settings: WriteSettings) -> None:
        self.settings = settings
        self.storage = Storage(
            settings.output, settings.storage_options, retries=settings.retries, backoff_s=settings.backoff_s
        )
        self.pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="write")

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = list(self.pool.map(self._finish, unpack(batch)))
        if records:
            self._write_metadata(records)
        return pa.table(
            {
                "id": pa.array([r["id"] for r in records], pa.string()),
                "status": pa.array([r["status"] for r in records], pa.string()),
                "duration_s": pa.array([r["duration_s"] or 0.0 for r in records], pa.float64()),
            }
        )

    def _finish(self, row: dict) -> dict:
        result = row.pop("_result", None)
        record = metadata_record(row, self.settings.checkpoint)
        if result is None:
            return record
        fmt = row.get("response_format") or "wav"
        key = self.settings.audio_key.format(id=row["id"], ext=fmt)
        waveform, rate = resample(result.waveform, result.sample_rate, self.settings.sample_rate)
        self.storage.write_bytes(key, encode_audio(waveform, rate, fmt))
        timings = {name: float(result.timings.get(name, 0.0)) for name in TIMING_FIELDS}
        record.update(
            status="ok",
            file_name=key,
            audio_uri=self.storage.uri(key),
            format=fmt,
            sample_rate=rate,
            duration_s=len(waveform) / rate,
            num_audio_frames=result.generated_frames,
            finish_reason=result.finish_reason,
            timings=timings,
        )
        return record

    def _write_metadata(self, records: list[dict]) -> None:
        buffer = io.BytesIO()
        pq.write_table(metadata_table(records), buffer)
        name = f"{METADATA_DIR}/part-{self.settings.run_id}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        self.storage.write_bytes(name, buffer.getvalue())


def metadata_record(row: dict, checkpoint: str) -> dict:
    record = {name: None for name in METADATA_COLUMNS}
    record.update({k: v for k, v in row.items() if k not in _REQUEST_ONLY})
    record["checkpoint"] = row.get("checkpoint") or checkpoint
    return record


def metadata_table(records: list[dict]) -> pa.Table:
    """Fixed columns with fixed types first; passthrough columns keep whatever type Arrow infers. Rows may
    name different passthrough columns (JSONL lines each have their own keys): every one gets a column."""
    columns = {f.name: pa.array([r.get(f.name) for r in records], f.type) for f in METADATA_FIELDS}
    extra = [k for k in dict.fromkeys(k for r in records for k in r) if k not in columns]
    for name in extra:
        values = [r.get(name) for r in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # Mixed types across rows: keep the values readable rather than drop the column.
            columns[name] = json_text(values)
    return pa.table(columns)


def json_text(values: list) -> pa.Array:
    """A column whose values share no Arrow type, kept readable: each value as JSON text (None stays null)."""
    return pa.array([None if v is None else json.dumps(v, default=str) for v in values], pa.string())


def resample(waveform: np.ndarray, rate: int, target: int | None) -> tuple[np.ndarray, int]:
    if not target or target == rate:
        return waveform, rate
    import torch
    import torchaudio

    resampled = torchaudio.functional.resample(torch.from_numpy(waveform), rate, target)
    return resampled.numpy().astype(np.float32), target


def encode_audio(waveform: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    subtype = "PCM_16"
    sf.write(buffer, np.clip(waveform, -1.0, 1.0), sample_rate, format=fmt.upper(), subtype=subtype)
    return buffer.getvalue()
