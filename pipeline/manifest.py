"""Manifest rows -> validated canonical rows -> SynthesisRequest.

Every row is checked here, before any GPU work, so that one bad row becomes an error record in the output
instead of a failed task. `validate_row` never raises for bad data; configuration mistakes in
`ManifestRules` itself raise at construction, since they would otherwise fail every row the same way.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from model import requests as rq
from model.normalize import normalize_transcript
from model.prompts import load_profiles
from model.requests import DecodedClip, KnownClip, Reference, RequestError, SynthesisRequest
from pipeline.json_lines import LineLabel

TEXT_ALIASES: tuple[str, ...] = ("text", "script", "prompt", "transcript")
MAX_ID_CHARS = 128
MAX_PROMPT_CHARS = 4000
MAX_REFERENCES = 8
RESPONSE_FORMATS = ("wav", "flac")
PROFILE_PREFIX = "profile:"

# ids become object-store keys and file names, so only a portable, traversal-free alphabet is allowed.
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
# C0/C1 controls other than \t \n \r: invisible in logs, and NUL and friends break tokenizers and files.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A lone surrogate cannot be encoded as UTF-8, so it would fail later in Arrow or the tokenizer.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


CANONICAL_COLUMNS: tuple[str, ...] = (
    *("id", "text", "system_prompt", "scene_prompt", "speaker_tag", "references"),
    *rq.PARAMETERS,
    "response_format",
)
# Input columns folded into canonical ones (or rewritten); every other column passes through untouched.
_CONSUMED = frozenset(
    CANONICAL_COLUMNS + TEXT_ALIASES + ("voice", "status", "error", "error_field", "_error", "_error_field")
)


def passthrough_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """The manifest columns that reach the metadata as they are."""
    return tuple(c for c in columns if c not in _CONSUMED)


@dataclass(frozen=True)
class ManifestRules:
    voice_library: str | None = None  # folder of NAME.wav + NAME.txt
    profiles_path: str | None = None  # upstream profile.yaml; default <voice_library>/profile.yaml
    max_text_chars: int = 20_000
    max_new_tokens_limit: int = 4096
    default_response_format: str = "wav"
    defaults: dict = field(default_factory=dict)  # generation defaults overriding model/requests.py

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - set(rq.PARAMETERS))
        if unknown:
            raise ValueError(f"unknown generation defaults {unknown}; known: {', '.join(rq.PARAMETERS)}")
        for name, value in self.defaults.items():
            try:
                _param(name, value, self)
            except RequestError as exc:
                raise ValueError(f"defaults.{exc.message}") from None
        if self.default_response_format not in RESPONSE_FORMATS:
            raise ValueError(f"default_response_format must be one of {', '.join(RESPONSE_FORMATS)}")

    def resolved_profiles_path(self) -> str | None:
        if self.profiles_path is not None:
            return self.profiles_path
        return None if self.voice_library is None else _library_profiles_path(self.voice_library)


# --- public API ------------------------------------------------------------------------------------------


def validate_row(row: dict, rules: ManifestRules) -> dict:
    """Canonical row with defaults applied, passthrough columns kept, and status/error/error_field set."""
    passthrough = {k: v for k, v in row.items() if k not in _CONSUMED}
    precomputed = row.get("_error")
    if isinstance(precomputed, str) and precomputed:
        # A front end (an eval-set adapter) already knows the line is bad and says why better than the
        # row checks could; its id is only a label for the error record, so it is kept as given.
        failed = dict.fromkeys(CANONICAL_COLUMNS)
        failed["id"] = recorded_id(row)
        field_name = row.get("_error_field") if isinstance(row.get("_error_field"), str) else "row"
        return {**failed, **passthrough, "status": "error", "error": precomputed, "error_field": field_name}
    try:
        canonical = _canonical(row, rules)
    except RequestError as exc:
        failed = dict.fromkeys(CANONICAL_COLUMNS)
        failed["id"] = recorded_id(row)
        return {**failed, **passthrough, "status": "error", "error": exc.message, "error_field": exc.field}
    return {**canonical, **passthrough, "status": "pending", "error": None, "error_field": None}


def mark_duplicates(rows: list[dict]) -> list[dict]:
    """Rows whose id was already seen become errors; invalid ids (already errors on `id`) are not tracked."""
    first_seen: dict[str, int] = {}
    out = []
    for index, row in enumerate(rows):
        row_id = row.get("id")
        if row.get("error_field") == "id" or not isinstance(row_id, str):
            out.append(row)
        elif row_id in first_seen:
            exc = RequestError("id", f"duplicate id (first seen at row {first_seen[row_id]})", row_id)
            out.append({**row, "status": "error", "error": exc.message, "error_field": "id"})
        else:
            first_seen[row_id] = index
            out.append(row)
    return out


def to_request(
    row: dict, audio_by_index: Sequence[bytes | KnownClip | DecodedClip | None] | None = None
) -> SynthesisRequest:
    """A SynthesisRequest from a pending canonical row; clip audio comes fetched, one entry per reference (a
    KnownClip with its codes filled in)."""
    if row.get("status") != "pending":
        raise ValueError(f"row {row.get('id')!r} is not pending: {row.get('error')}")
    refs = []
    for i, ref in enumerate(list(row.get("references") or [])):
        transcript, tag = ref.get("transcript") or "", ref.get("speaker_tag")
        if ref.get("profile") is not None:
            refs.append(Reference(profile=ref["profile"], transcript=transcript, speaker_tag=tag))
            continue
        audio = audio_by_index[i] if audio_by_index is not None and i < len(audio_by_index) else None
        if audio is None or (isinstance(audio, KnownClip) and audio.codes is None):
            raise RequestError("references", f"reference {i} audio has not been fetched", ref.get("audio"))
        if isinstance(audio, DecodedClip):
            clip = {"audio": audio.samples, "sample_rate": audio.sample_rate, "cache_key": audio.source_hash}
        elif isinstance(audio, KnownClip):
            clip = {"codes": audio.codes}
        else:
            clip = {"audio": audio}
        refs.append(Reference(**clip, transcript=transcript, speaker_tag=tag))
    # A row-level speaker_tag names the row's single voice when that voice carries no tag of its own.
    if row.get("speaker_tag") and len(refs) == 1 and refs[0].speaker_tag is None:
        refs[0].speaker_tag = row["speaker_tag"]
    return SynthesisRequest(
        text=row["text"],
        id=row["id"],
        system_prompt=row.get("system_prompt"),
        scene_prompt=row.get("scene_prompt"),
        references=refs,
        # Arrow round trips may hand numbers back as numpy scalars.
        **{name: spec.kind(row[name]) for name, spec in rq.PARAMETERS.items()},
    )


# --- row checks ------------------------------------------------------------------------------------------


def _canonical(row: dict, rules: ManifestRules) -> dict:
    out: dict = {"id": _id(row.get("id")), "text": _text(row, rules)}
    for name in ("system_prompt", "scene_prompt", "speaker_tag"):
        out[name] = _optional_text(row.get(name), MAX_PROMPT_CHARS, name)
    out["references"] = _voices(row, rules)
    for name in rq.PARAMETERS:
        value = row.get(name)
        # NaN is deliberately not "missing": in a float column it is a value someone wrote. A blank string
        # is: an empty cell of a CSV column read as text.
        if value is None or _is_na(value) or (isinstance(value, str) and not value.strip()):
            value = rules.defaults.get(name, rq.PARAMETERS[name].default)
        out[name] = _param(name, value, rules)
    out["response_format"] = _response_format(row.get("response_format"), rules)
    return out


def _is_na(value: object) -> bool:
    return type(value).__name__ == "NAType"  # pandas.NA, without importing pandas


def _missing_str(value: object) -> bool:
    # pandas fills absent cells of string columns with NaN; a string column cannot otherwise hold NaN.
    return value is None or _is_na(value) or (isinstance(value, float) and math.isnan(value))


def _id(value: object) -> str:
    if _missing_str(value):
        raise RequestError("id", "is missing")
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = str(int(value))  # CSV readers infer integer ids
    if not isinstance(value, str):
        raise RequestError("id", f"must be a string, got {type(value).__name__}", value)
    if not value:
        raise RequestError("id", "is empty", value)
    if len(value) > MAX_ID_CHARS:
        raise RequestError("id", f"is longer than {MAX_ID_CHARS} characters ({len(value)})", value)
    if match := _ANY_CONTROL.search(value):
        raise RequestError("id", f"contains control character U+{ord(match.group()):04X}", value)
    if value.startswith(("/", "\\")):
        raise RequestError("id", "is an absolute path", value)
    if "/" in value or "\\" in value:
        raise RequestError("id", "contains a path separator", value)
    if value in (".", ".."):
        raise RequestError("id", "must not be '.' or '..'", value)
    if ".." in value:
        raise RequestError("id", "must not contain '..'", value)
    if not _SAFE_NAME.fullmatch(value):
        raise RequestError("id", "may only contain letters, digits, '.', '_' and '-'", value)
    return value


def canonical_id(value: object) -> str | None:
    """The id a manifest's id value becomes (see id_label), or None when it is not a valid id."""
    try:
        return _id(value)
    except RequestError:
        return None


def recorded_id(row: dict) -> str:
    """The id a row's metadata record carries, whatever is wrong with the row: the id an eval-set adapter
    gave a line it already found bad, else `id_label` of its id. Resume skips the rows whose recorded id
    the output holds, so a finished row is skipped even when its id is invalid."""
    row_id = row.get("id")
    if isinstance(row_id, str) and isinstance(row.get("_error"), str) and row["_error"]:
        return row_id
    return id_label(row_id)


def id_label(value: object) -> str:
    """An id value as records name it: its canonical id (an integer id, as CSV and Parquet readers infer
    them, becomes its digits), a bad line's label as it is (pipeline.json_lines.LineLabel), or the repr of
    an invalid one. The duplicate check and resume compare these, never raw values: 5 and the finished "5"
    are one row, and so are two runs' invalid 'a/b'."""
    if isinstance(value, LineLabel):
        return value
    try:
        return _id(value)
    except RequestError:
        shown = repr(value)
        return shown if len(shown) <= 200 else shown[:197] + "..."


def _text(row: dict, rules: ManifestRules) -> str:
    given = [(name, row[name]) for name in TEXT_ALIASES if not _missing_str(row.get(name))]
    if not given:
        raise RequestError("text", f"is missing (also looked for {', '.join(TEXT_ALIASES[1:])})")
    name, value = given[0]
    for other, other_value in given[1:]:
        if not (isinstance(other_value, str) and other_value == value):
            raise RequestError(
                name, f"conflicts with {other} ({repr(other_value):.60}); give only one", value
            )
    text = _optional_text(value, rules.max_text_chars, name)
    if not text.strip():
        raise RequestError(name, "is empty or whitespace only", text)
    if not normalize_transcript(text):
        raise RequestError(name, "is empty after normalisation", text)
    return text


def _optional_text(value: object, limit: int, name: str, label: str = "") -> str | None:
    """The string, or None when missing; `label` prefixes reasons for values nested inside a column."""
    prefix = f"{label} " if label else ""
    if _missing_str(value):
        return None
    if not isinstance(value, str):
        raise RequestError(name, f"{prefix}must be a string, got {type(value).__name__}", value)
    # Length first, so an oversized value is rejected without scanning it.
    if len(value) > limit:
        raise RequestError(name, f"{prefix}is longer than {limit} characters ({len(value)})", value)
    for pattern, what in ((_CONTROL, "control character"), (_SURROGATE, "unpaired surrogate")):
        if match := pattern.search(value):
            where = f"U+{ord(match.group()):04X} at position {match.start()}"
            raise RequestError(name, f"{prefix}contains {what} {where}", value)
    return value


def _param(name: str, value: object, rules: ManifestRules) -> int | float:
    high = rules.max_new_tokens_limit if name == "max_new_tokens" else None
    return rq.parameter_value(name, value, high, lenient=True)


def _response_format(value: object, rules: ManifestRules) -> str:
    if _missing_str(value):
        return rules.default_response_format
    if not isinstance(value, str) or value.strip().lower() not in RESPONSE_FORMATS:
        raise RequestError("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}", value)
    return value.strip().lower()


# --- voices ----------------------------------------------------------------------------------------------


def _voices(row: dict, rules: ManifestRules) -> list[dict]:
    refs, voice = row.get("references"), row.get("voice")
    if isinstance(refs, np.ndarray):
        refs = refs.tolist()  # pandas and Ray hand list columns over as object arrays
    has_refs, has_voice = _given(refs), _given(voice)
    if has_refs and has_voice:
        raise RequestError("voice", "give either voice or references, not both", voice)
    if has_voice:
        return _resolve_voice(voice, rules)
    return _references(refs, rules) if has_refs else []


def _given(value: object) -> bool:
    """Whether a voice or references cell holds anything: a blank string (an empty CSV cell) or an empty
    list does not."""
    if _missing_str(value):
        return False
    if isinstance(value, str):
        return bool(value.strip())
    return not (isinstance(value, (list, tuple)) and not value)


def _references(value: object, rules: ManifestRules) -> list[dict]:
    if isinstance(value, str):
        # A CSV cell cannot hold a list, so it holds the list as JSON.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RequestError(
                "references",
                'must be a list of dicts; in a CSV cell, that list as JSON: [{"audio": "...", "transcript": "..."}]',
                value,
            ) from None
    if not isinstance(value, (list, tuple)):
        raise RequestError("references", f"must be a list of dicts, got {type(value).__name__}", value)
    if len(value) > MAX_REFERENCES:
        raise RequestError("references", f"has {len(value)} entries; at most {MAX_REFERENCES}", value)
    return [_reference(i, item, rules) for i, item in enumerate(value)]


def _reference(i: int, item: object, rules: ManifestRules) -> dict:
    where = f"reference {i}"
    if not isinstance(item, dict):
        raise RequestError("references", f"{where} must be a dict, got {type(item).__name__}", item)
    # Struct columns carry every field of the union schema, so only keys with a value count as unknown.
    extra = sorted(
        str(k) for k, v in item.items() if k not in Reference.__dataclass_fields__ and v is not None
    )
    if extra:
        raise RequestError("references", f"{where} has unknown keys {extra}", item)
    audio, profile = _audio_source(item.get("audio")), item.get("profile")
    # A profile entry is accepted so that an already canonical row validates again unchanged.
    if audio is None and profile is not None:
        if not isinstance(profile, str) or not profile.strip():
            raise RequestError("references", f"{where} profile must be a non-empty string", item)
    elif audio is None:
        raise RequestError("references", f"{where} is missing audio", item)
    elif not (isinstance(audio, str) and audio.strip() or isinstance(audio, bytes) and audio):
        raise RequestError(
            "references",
            f"{where} audio must be a non-empty string (path, URI or data), encoded bytes, or a datasets "
            "Audio value {bytes, path}",
            item,
        )
    elif profile is not None:
        raise RequestError("references", f"{where} has both audio and profile", item)
    transcript = _optional_text(
        item.get("transcript"), rules.max_text_chars, "references", f"{where} transcript"
    )
    tag = _optional_text(item.get("speaker_tag"), MAX_PROMPT_CHARS, "references", f"{where} speaker_tag")
    return {"audio": audio, "transcript": transcript or "", "speaker_tag": tag, "profile": profile}


def _audio_source(value: object) -> object:
    """A reference's audio as pipeline.references.fetch_reference takes it. A 🤗 datasets Audio value, as
    a dataset's Parquet files hold it ({bytes, path}), gives its bytes, or its path where it has none."""
    if isinstance(value, dict) and value.keys() <= {"bytes", "path"}:
        return value.get("bytes") or value.get("path")
    return value


def _resolve_voice(value: object, rules: ManifestRules) -> list[dict]:
    if not isinstance(value, str):
        raise RequestError("voice", f"must be a string, got {type(value).__name__}", value)
    names = [part.strip() for part in value.split(",")]
    if len(names) > MAX_REFERENCES:
        raise RequestError("voice", f"names {len(names)} voices; at most {MAX_REFERENCES}", value)
    return [_one_voice(name, value, rules) for name in names]


def _one_voice(name: str, value: str, rules: ManifestRules) -> dict:
    if not name:
        raise RequestError("voice", "has an empty entry", value)
    if name.startswith(PROFILE_PREFIX):
        profiles = _profiles(rules, value)
        wanted = name[len(PROFILE_PREFIX) :].strip()
        if wanted not in profiles:
            raise RequestError("voice", f"unknown profile {wanted!r}; available: {_listing(profiles)}", value)
        return _ref(None, "", profiles[wanted])
    if rules.voice_library is None:
        raise RequestError("voice", f"no voice library is configured for {name!r}", value)
    folder, clips = _library(rules.voice_library)
    if clips is None:
        raise RequestError("voice", f"voice library {folder} is not a folder", value)
    if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
        raise RequestError("voice", f"{name!r} is not a valid voice name", value)
    if name not in clips:
        raise RequestError("voice", f"unknown voice {name!r}; available: {_listing(clips)}", value)
    try:
        transcript = _clip_transcript(folder, name)
    except (OSError, UnicodeDecodeError) as exc:
        raise RequestError("voice", f"cannot read {name}.txt: {exc}", value) from None
    return _ref(str(Path(folder) / f"{name}.wav"), transcript, None)


def _ref(audio: str | None, transcript: str, profile: str | None) -> dict:
    return {"audio": audio, "transcript": transcript, "speaker_tag": None, "profile": profile}


def _profiles(rules: ManifestRules, value: str) -> dict[str, str]:
    path = rules.resolved_profiles_path()
    if path is None:
        raise RequestError("voice", "no profiles file is configured", value)
    try:
        return _load_profiles(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise RequestError("voice", f"cannot read profiles file {path}: {exc}", value) from None


def _listing(names: Sequence[str] | dict[str, str], limit: int = 10) -> str:
    names = list(names)
    shown = ", ".join(names[:limit]) or "(none)"
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# Cached on resolved paths because validate_row runs once per row and these read the filesystem.
@functools.lru_cache(maxsize=32)
def _load_profiles(path: str) -> dict[str, str]:
    return load_profiles(path)


@functools.lru_cache(maxsize=32)
def _library(folder: str) -> tuple[str, tuple[str, ...] | None]:
    """The folder as an absolute path, and its clip names (None when it is not a folder)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        return str(root), None
    names = (p.stem for p in root.glob("*.wav") if (root / f"{p.stem}.txt").is_file())
    return str(root), tuple(sorted(n for n in names if _SAFE_NAME.fullmatch(n)))


@functools.lru_cache(maxsize=32)
def _library_profiles_path(folder: str) -> str | None:
    path = Path(folder) / "profile.yaml"
    return str(path) if path.is_file() else None


@functools.lru_cache(maxsize=1024)
def _clip_transcript(folder: str, name: str) -> str:
    return (Path(folder) / f"{name}.txt").read_text(encoding="utf-8").strip()
