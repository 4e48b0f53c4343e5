"""Evaluation-set files -> manifest rows of the dataset job, plus the output layout their scorers read.

Adapters never raise for bad lines: a malformed line becomes a row carrying ``_error`` ("line N: reason")
and ``_error_field``, so one typo in a 1000-line set does not cost the whole evaluation run. Problems with
the arguments themselves (an unreadable file, a bad ``voice``) do raise, since every row would share them.
"""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any

from pipeline.storage import open_input

SEEDTTS = "seedtts"
EMERGENT = "emergent"

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Output keys become file names at the root of the run's folder, so nothing that could leave it.
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def read_seedtts_meta(
    uri: str, storage_options: dict[str, Any] | None = None, *, language: str | None = None
) -> list[dict]:
    """Rows from a Seed-TTS Eval ``meta.lst`` (``utt|prompt_text|prompt_wav|infer_text[|gt_wav]``).

    ``language`` (e.g. "en" for en/meta.lst, "zh" for zh/meta.lst) is copied onto every row for the
    scorer, since the file itself does not say.
    """
    base = _parent(uri)
    rows: list[dict] = []
    first_line: dict[str, int] = {}
    for number, line in _lines(uri, storage_options):
        fields = [field.strip() for field in line.split("|")]
        utt = fields[0] or None
        row = _row(utt, SEEDTTS, number, language=language, prompt_text=None, prompt_wav=None, gt_wav=None)
        rows.append(row)
        if len(fields) not in (4, 5):
            _fail(row, "line", f"expected 4 or 5 '|'-separated fields, got {len(fields)}")
            continue
        _, prompt_text, prompt_wav, infer_text, *rest = fields
        row.update(prompt_text=prompt_text, prompt_wav=prompt_wav)
        if rest and rest[0]:
            row["gt_wav"] = rest[0]
        if utt is None:
            _fail(row, "utt", "empty utt")
        elif not infer_text:
            _fail(row, "infer_text", "empty infer_text")
        elif not prompt_wav:
            _fail(row, "prompt_wav", "empty prompt_wav")
        elif utt in first_line:
            _fail(row, "utt", f"duplicate utt (first at line {first_line[utt]})")
        else:
            first_line[utt] = number
            row["text"] = infer_text
            audio = _resolve(base, prompt_wav)
            row["references"] = [{"audio": audio, "transcript": prompt_text, "speaker_tag": None}]
    return rows


def read_emergent_jsonl(
    uri: str, storage_options: dict[str, Any] | None = None, voice: dict | None = None
) -> list[dict]:
    """Rows from EmergentTTS-Eval JSONL; ``id`` is the 0-based row index, which its scorer relies on."""
    references = _voice_references(voice)
    rows: list[dict] = []
    for index, (number, line) in enumerate(_lines(uri, storage_options)):
        row = _row(str(index), EMERGENT, number, unique_id_eval=index)
        row.update(category=None, evolution_depth=None, language=None)
        rows.append(row)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(row, "line", f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            _fail(row, "line", f"expected a JSON object, got {type(record).__name__}")
            continue
        for name in ("category", "evolution_depth", "language"):
            row[name] = record.get(name)
        text = record.get("text_to_synthesize")
        if not isinstance(text, str) or not text.strip():
            _fail(row, "text_to_synthesize", "missing or empty text_to_synthesize")
            continue
        row["text"] = text
        row["references"] = [dict(ref) for ref in references]
    return rows


def output_key(eval_set: str, row: dict) -> str:
    """Key, relative to the run's output folder, where each scorer expects this row's audio."""
    if eval_set == SEEDTTS:
        name = row.get("id")
    elif eval_set == EMERGENT:
        name = row.get("unique_id_eval")
        name = str(name) if isinstance(name, int) and not isinstance(name, bool) else None
    else:
        raise ValueError(f"unknown eval set {eval_set!r}; known: {SEEDTTS}, {EMERGENT}")
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"row has no usable {eval_set} output name: {name!r}")
    return f"{name}.wav"


# --- helpers ---------------------------------------------------------------------------------------------


def _lines(uri: str, storage_options: dict[str, Any] | None) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; line numbers count blank lines so they match editors."""
    fs, path = open_input(uri, storage_options)
    with fs.open(path, "rb") as handle:
        text = handle.read().decode("utf-8-sig")  # tolerate a BOM from Windows editors
    return [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _row(row_id: str | None, eval_set: str, number: int, **extra: Any) -> dict:
    # Every row of a set has the same columns, so Arrow-backed readers infer one schema for all blocks.
    return {
        "id": row_id,
        "text": None,
        "references": [],
        "eval_set": eval_set,
        "line_number": number,
        **extra,
        "_error": None,
        "_error_field": None,
    }


def _fail(row: dict, field: str, reason: str) -> None:
    row["text"] = None
    row["references"] = []
    row["_error"] = f"line {row['line_number']}: {reason}"
    row["_error_field"] = field


def _parent(uri: str) -> str:
    if _SCHEME.match(uri):
        return uri.rsplit("/", 1)[0]
    return posixpath.dirname(posixpath.abspath(uri))


def _resolve(base: str, path: str) -> str:
    """``path`` relative to ``base`` (a folder URI or absolute path); absolute paths and URIs are kept."""
    if _SCHEME.match(path) or path.startswith("/") or path.startswith("data:"):
        return path
    scheme = _SCHEME.match(base)
    if scheme is None:
        return posixpath.normpath(posixpath.join(base, path))
    prefix, rest = base[: scheme.end()], base[scheme.end() :]
    return prefix + posixpath.normpath(posixpath.join(rest, path))


def _voice_references(voice: dict | None) -> list[dict]:
    if voice is None:
        return []
    if not isinstance(voice, dict) or not isinstance(voice.get("audio"), str) or not voice["audio"]:
        raise ValueError("voice must be a dict with a non-empty 'audio' string (and optional 'transcript')")
    transcript = voice.get("transcript") or ""
    if not isinstance(transcript, str):
        raise ValueError("voice['transcript'] must be a string")
    return [{"audio": voice["audio"], "transcript": transcript, "speaker_tag": voice.get("speaker_tag")}]
