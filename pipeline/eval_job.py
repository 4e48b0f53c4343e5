"""Evaluation-set regeneration: an eval-set file -> a manifest -> the dataset job -> optional scores.

Seed-TTS and EmergentTTS rows are written to ``<output>/_inputs/manifest.parquet`` so that the dataset job
reads them like any manifest, and their audio lands where each set's scorer looks (``<output>/<utt>.wav``,
``<output>/<index>.wav``). A bad line stays in that manifest with a precomputed ``_error``: validation turns
it into an error metadata row (line number and reason) and it never reaches the GPU.

Local prompt wavs: the meta file's folder is added to the fetch policy's allowed roots (and its parent when
a prompt path starts with ``../``, as Seed-TTS Eval's own layout does), so a set is readable where it lies
without listing it in ``voices.allowed_roots``; a local ``voice`` audio file named in the config is allowed
the same way. Anything else local must be under the configured roots.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset_job import DatasetJob, run_dataset_job
from pipeline.eval_scoring import ScoringOptions, run_scoring
from pipeline.eval_sets import EMERGENT, SEEDTTS, output_key, read_emergent_jsonl, read_seedtts_meta
from pipeline.stages import AUDIO_DIR, json_text
from pipeline.storage import Storage

MANIFEST = "manifest"
EVAL_SETS = (SEEDTTS, EMERGENT, MANIFEST)
INPUTS_KEY = "_inputs/manifest.parquet"
# Both scorers read <output>/<name>.wav, and the adapters make the row id that name (see output_key).
SCORER_AUDIO_KEY = "{id}.{ext}"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class EvalInputs:
    """What the dataset job reads for an eval set, and where the rows' audio and prompts are."""

    eval_set: str
    meta: str
    manifest: str
    audio_key: str
    allowed_roots: tuple[str, ...] = ()
    rows: int | None = None  # None for eval_set=manifest, which is not read by the driver
    bad_lines: int = 0


@dataclass
class EvalJob:
    dataset: DatasetJob  # its manifest is inputs.manifest; audio key, rate and roots are set from inputs
    inputs: EvalInputs
    sample_rate: int | None = None
    scoring: ScoringOptions = field(default_factory=ScoringOptions)


def prepare_inputs(
    eval_set: str,
    meta: str,
    output: str,
    storage_options: dict | None = None,
    *,
    voice: str | dict | None = None,
    language: str | None = None,
) -> EvalInputs:
    """Adapter rows -> ``<output>/_inputs/manifest.parquet``; eval_set=manifest passes ``meta`` through.

    ``voice`` (EmergentTTS only) is a voice-library name, resolved by validation like a manifest's
    ``voice`` column, or ``{"audio": ..., "transcript": ...}``. Raises ValueError for arguments every row
    would share (unknown set, a voice for a set that has its own prompts, an empty file).
    """
    if eval_set not in EVAL_SETS:
        raise ValueError(f"unknown eval_set {eval_set!r}; known: {', '.join(EVAL_SETS)}")
    if voice is not None and eval_set != EMERGENT:
        raise ValueError(f"voice is only used with eval_set={EMERGENT} (the other sets name their prompts)")
    if eval_set == MANIFEST:
        return EvalInputs(eval_set, meta, meta, AUDIO_DIR + "/{id}.{ext}")
    roots: list[str] = []
    if eval_set == SEEDTTS:
        rows = read_seedtts_meta(meta, storage_options, language=language)
    else:
        if isinstance(voice, dict):
            voice, voice_root = _local_voice(voice)
            roots += voice_root
        rows = read_emergent_jsonl(meta, storage_options, voice if isinstance(voice, dict) else None)
        for row in rows:
            # A library name goes through validation's `voice` column, which knows the library.
            row["voice"] = voice if isinstance(voice, str) and row["_error"] is None else None
    if not rows:
        raise ValueError(f"{meta!r} has no lines")
    _check_output_names(eval_set, rows)
    _label_bad_rows(rows)
    storage = Storage(output, storage_options)
    buffer = io.BytesIO()
    pq.write_table(_table(rows), buffer)
    storage.write_bytes(INPUTS_KEY, buffer.getvalue())
    return EvalInputs(
        eval_set,
        meta,
        storage.uri(INPUTS_KEY),
        SCORER_AUDIO_KEY,
        allowed_roots=tuple(dict.fromkeys(_meta_roots(meta, rows) + roots)),
        rows=len(rows),
        bad_lines=sum(1 for r in rows if r["_error"] is not None),
    )


def run_eval_job(job: EvalJob) -> dict:
    """Synthesise the set (resuming like any dataset job), then score it when asked; returns summary.json."""
    fetch = job.dataset.fetch
    dataset = replace(
        job.dataset,
        manifest=job.inputs.manifest,
        audio_key=job.inputs.audio_key,
        sample_rate=job.sample_rate,
        fetch=replace(
            fetch, allowed_roots=tuple(dict.fromkeys(fetch.allowed_roots + job.inputs.allowed_roots))
        ),
    )
    summary = run_dataset_job(dataset)
    summary["eval"] = {
        "eval_set": job.inputs.eval_set,
        "meta": job.inputs.meta,
        "rows": job.inputs.rows,
        "bad_lines": job.inputs.bad_lines,
        "sample_rate": job.sample_rate,
    }
    if job.scoring.enabled:
        summary["scores"] = run_scoring(dataset, job.scoring)
    Storage(dataset.output, dataset.storage_options).write_text(
        "summary.json", json.dumps(summary, indent=2) + "\n"
    )
    return summary


# --- helpers ---------------------------------------------------------------------------------------------


def _check_output_names(eval_set: str, rows: list[dict]) -> None:
    """A row whose id cannot be its scorer's file name is a bad line too, caught before synthesis."""
    for row in rows:
        if row["_error"] is not None:
            continue
        try:
            key = output_key(eval_set, row)
        except ValueError as exc:
            key, reason = None, str(exc)
        else:
            reason = f"output name {key!r} does not match id {row['id']!r}"
        if key != f"{row['id']}.wav":
            row.update(text=None, references=[], _error=f"line {row['line_number']}: {reason}")
            row["_error_field"] = "utt" if eval_set == SEEDTTS else "line"


def _label_bad_rows(rows: list[dict]) -> None:
    """Give a bad row that shares its id (or has none) the id ``<id>@line<N>``.

    The dataset job errors every copy of a duplicated id, which would cost the good first ``utt`` its audio;
    '@' cannot occur in a valid id, so the label never collides with a real row.
    """
    counts = Counter(r["id"] for r in rows)
    for row in rows:
        if row["_error"] is not None and (row["id"] is None or counts[row["id"]] > 1):
            row["id"] = f"{row['id'] or ''}@line{row['line_number']}"


def _table(rows: list[dict]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    # A JSONL field with mixed types (a number here, a string there): keep it readable as JSON text.
    columns = {}
    for name in rows[0]:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = json_text(values)
    return pa.table(columns)


def _local_path(uri: str) -> str | None:
    """The absolute local path of ``uri``, or None for remote URIs."""
    match = _SCHEME.match(uri)
    if match is None:
        return os.path.abspath(uri)
    return uri[len("file://") :] if match.group(1).lower() == "file" else None


def _meta_roots(meta: str, rows: list[dict]) -> list[str]:
    path = _local_path(meta)
    if path is None:
        return []
    folder = os.path.dirname(path)
    roots = [folder]
    prompts = [r.get("prompt_wav") for r in rows if r["_error"] is None]
    if any(isinstance(p, str) and posixpath.normpath(p).startswith("../") for p in prompts):
        roots.append(os.path.dirname(folder))
    return roots


def _local_voice(voice: dict) -> tuple[dict, list[str]]:
    """An absolute path for a local voice file (workers do not share the driver's working directory)."""
    audio = voice.get("audio")
    if not isinstance(audio, str) or not os.path.isfile(audio):
        return voice, []  # a URI, a data: URI, or base64 (or a missing file, which the fetch reports)
    path = os.path.abspath(audio)
    return {**voice, "audio": path}, [os.path.dirname(path)]
