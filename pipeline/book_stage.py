"""Books manifest rows -> one row per chapter, ready for the synthesis actors (CPU).

Everything that can make a book fail before any GPU time is checked here: the row itself (book id, voices,
generation parameters, with the dataset job's rules), the book file (readable, no DRM, no empty chapter),
the word limit and the speaker tags. A failing book becomes a single error row that flows through the later
stages untouched, so the driver can report it while every other book goes on.

Manifest columns: book_id (dataset id rules), source (path under sources.allowed_roots, file://, s3://...,
http(s):// of a .txt, .md or .epub), title and author (override the book's own), narrator (voice-library
name, profile:NAME, or {audio, transcript}; as a dict or as JSON text), characters ({SPEAKERn: voice}: a
chapter with [SPEAKERn] tags is read with these voices, the others with the narrator), language,
system_prompt, scene_prompt and the sampling parameters of the dataset manifest (temperature, top_p,
top_k, max_new_tokens, ras_win_len, ras_win_max_num_repeat, seed).
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from model.chunking import chunk_text, count_words
from model.normalize import normalize_transcript, speaker_tags
from model.requests import RequestError
from pipeline.book_layout import COVER_EXTENSIONS, RESERVED_BOOK_IDS, cover_key
from pipeline.books import Book, BookError, read_book
from pipeline.json_lines import LineLabel, manifest_rows
from pipeline.manifest import CANONICAL_COLUMNS, ManifestRules, canonical_id, validate_row
from pipeline.references import FetchPolicy, fetch_reference
from pipeline.stages import pack
from pipeline.storage import Storage

# Sampling parameters a book row may set; the rest of the canonical columns are not book settings.
GENERATION_PARAMS: tuple[str, ...] = tuple(
    c
    for c in CANONICAL_COLUMNS
    if c
    not in ("id", "text", "system_prompt", "scene_prompt", "speaker_tag", "references", "response_format")
)
_SPEAKER_KEY = re.compile(r"SPEAKER\d+")
_TURN = re.compile(r"\s*(\[SPEAKER\d+\])")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The dataset rules name the columns they check; a books manifest calls them differently.
_FIELD_NAMES = {"id": "book_id", "voice": "narrator", "references": "narrator"}
_MAX_META_CHARS = 1000


class BookInputError(Exception):
    """A book that cannot be rendered: which manifest field is at fault and the whole message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    @classmethod
    def of(cls, exc: RequestError) -> BookInputError:
        return cls(exc.field, exc.message)


@dataclass
class ChunkingSettings:
    method: str = "sentence"  # model.chunking.METHODS
    max_words: int | None = None  # None: the method's default
    max_turns: int = 1  # "speaker" method only


@dataclass
class BookSettings:
    output: str
    storage_options: dict | None = None
    rules: ManifestRules = field(default_factory=ManifestRules)
    voices: FetchPolicy = field(default_factory=FetchPolicy)  # reference clips
    sources: FetchPolicy = field(default_factory=FetchPolicy)  # book files
    chunking: ChunkingSettings = field(default_factory=ChunkingSettings)
    max_book_words: int = 200_000
    # Relative local sources are relative to where the job was started, not to a Ray worker's folder.
    base_dir: str = ""


class BookStage:
    """Validate, fetch and parse each book, resolve its voices, and explode it into chapter rows."""

    def __init__(self, settings: BookSettings, skip_ids: Any = None) -> None:
        import ray

        self.settings = settings
        self.storage = Storage(settings.output, settings.storage_options)
        self.skip = ray.get(skip_ids) if isinstance(skip_ids, ray.ObjectRef) else (skip_ids or frozenset())

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[dict] = []
        for raw in manifest_rows(batch, id_column="book_id"):
            if canonical_id(raw.get("book_id")) in self.skip:
                continue
            rows.extend(self.plan(raw))
        return pack(rows)

    def plan(self, raw: dict) -> list[dict]:
        """Chapter rows of one book, or one error row naming the field at fault."""
        if isinstance(raw.get("book_id"), LineLabel):  # a manifest line that holds no book
            return [book_error_row(raw, raw["_error_field"], raw["_error"])]
        try:
            return self._chapter_rows(raw)
        except BookInputError as exc:
            return [book_error_row(raw, exc.field, exc.message)]

    def _chapter_rows(self, raw: dict) -> list[dict]:
        request = self._request(raw)
        book_id = request["id"]
        characters = self._characters(raw.get("characters"))
        book = self._read(raw.get("source"))
        title = _meta(raw, "title") or book.title or book_id
        author = _meta(raw, "author") or book.author or "Unknown"
        self._check_limits(book, characters)
        narrator = request["references"]
        narrator_audio = self._fetch_voices(narrator, "narrator")
        character_refs = [ref for _, ref in sorted(characters.items(), key=lambda kv: _tag_number(kv[0]))]
        character_audio = self._fetch_voices(character_refs, "characters")
        cover = None
        if book.cover is not None and book.cover_mime in COVER_EXTENSIONS:
            cover = cover_key(book_id, book.cover_mime)
            self.storage.write_bytes(cover, book.cover)

        rows = []
        for chapter in book.chapters:
            chunks, paragraph_ends = self.chunk(chapter.text)
            multi = bool(speaker_tags(chapter.text))
            rows.append(
                {
                    **_book_fields(raw, book_id, title, author),
                    "kind": "chapter",
                    "status": "pending",
                    "chapter": chapter.index + 1,  # 1-based, like track numbers and file names
                    "chapter_title": chapter.title,
                    "chapters": len(book.chapters),
                    "cover_key": cover,
                    "cover_mime": book.cover_mime if cover else None,
                    "chunks": chunks,
                    "paragraph_ends": paragraph_ends,
                    # Tagged chapters speak with the characters' voices, the others with the narrator's.
                    "request": {**request, "references": character_refs if multi else narrator},
                    "_audio": character_audio if multi else narrator_audio,
                }
            )
        return rows

    # ---- the row ------------------------------------------------------------------------------------

    def _request(self, raw: dict) -> dict:
        """The canonical request every chunk of the book starts from: voice, prompts, sampling."""
        probe = {
            "id": raw.get("book_id"),
            "text": "-",  # the book's text comes from its source; the rules only need something here
            "system_prompt": raw.get("system_prompt"),
            "scene_prompt": raw.get("scene_prompt"),
            **{name: raw.get(name) for name in GENERATION_PARAMS},
        }
        narrator = _decode_json(raw.get("narrator"))
        if narrator is None:
            # Chapters are generated apart, so without a reference each chapter would pick its own voice.
            raise BookInputError(
                "narrator", "narrator: is missing; give a voice name, profile:NAME or {audio, transcript}"
            )
        probe.update(_voice_columns(narrator, "narrator"))
        row = self._validated(probe, _FIELD_NAMES)
        book_id = row["id"]
        if book_id in RESERVED_BOOK_IDS:
            raise BookInputError(
                "book_id", f"book_id (value {book_id!r}): is reserved for the run's own files"
            )
        return {k: row[k] for k in ("id", "system_prompt", "scene_prompt", "references", *GENERATION_PARAMS)}

    def _characters(self, value: object) -> dict[str, dict]:
        value = _decode_json(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise BookInputError(
                "characters", f"characters: must be a dict of SPEAKERn -> voice, got {type(value).__name__}"
            )
        out = {}
        for tag, voice in value.items():
            voice = _decode_json(voice)
            if voice is None:  # Arrow gives every row every key of the column's struct type
                continue
            if not isinstance(tag, str) or not _SPEAKER_KEY.fullmatch(tag):
                raise BookInputError("characters", f"characters: key {tag!r} is not SPEAKERn (e.g. SPEAKER0)")
            where = f"characters.{tag}"
            probe = {"id": "character", "text": "-", **_voice_columns(voice, where)}
            (ref,) = self._validated(probe, {"voice": where, "references": where})["references"]
            out[tag] = {**ref, "speaker_tag": tag}
        return out

    def _validated(self, probe: dict, names: dict[str, str]) -> dict:
        row = validate_row(probe, self.settings.rules)
        if row["status"] != "error":
            return row
        old = row["error_field"]
        new = names.get(old, old)
        message = row["error"]
        if new != old and message.startswith(old):
            message = new + message[len(old) :]
        raise BookInputError(new, message)

    def _fetch_voices(self, refs: list[dict], field_name: str) -> list[bytes | None]:
        out = []
        for ref in refs:
            where = f"characters.{ref['speaker_tag']}" if field_name == "characters" else field_name
            try:
                out.append(
                    None
                    if ref["audio"] is None
                    else fetch_reference(ref["audio"], self.settings.voices, where)
                )
            except RequestError as exc:
                raise BookInputError.of(exc) from None
        return out

    # ---- the book -----------------------------------------------------------------------------------

    def _read(self, source: object) -> Book:
        if not isinstance(source, str) or not source.strip():
            raise BookInputError("source", "source: is missing; give a path or URI of a .txt, .md or .epub")
        location = source
        if not _SCHEME.match(source) and not os.path.isabs(source):
            location = os.path.join(self.settings.base_dir, source)
        try:
            data = fetch_reference(location, self.settings.sources, "source")
        except RequestError as exc:
            raise BookInputError.of(exc) from None
        name = urllib.parse.urlsplit(source).path if _SCHEME.match(source) else source
        try:
            return read_book(data, name)
        except BookError as exc:
            raise BookInputError.of(RequestError("source", exc.reason, source)) from None

    def _check_limits(self, book: Book, characters: dict[str, dict]) -> None:
        if not book.chapters:
            raise BookInputError("source", "source: the book has no chapters with text")
        for chapter in book.chapters:
            if not any(ch.isalnum() for ch in chapter.text):
                raise BookInputError(
                    "source", f"source: chapter {chapter.index + 1} ({chapter.title!r}) is empty"
                )
        words = sum(count_words(chapter.text) for chapter in book.chapters)
        limit = self.settings.max_book_words
        if words > limit:
            raise BookInputError(
                "source", f"source: the book has {words} words, more than max_book_words={limit}"
            )
        for chapter in book.chapters:
            tags = speaker_tags(chapter.text)
            missing = [tag for tag in tags if tag not in characters]
            if tags and not characters:
                raise BookInputError(
                    "characters",
                    f"characters: chapter {chapter.index + 1} ({chapter.title!r}) has [SPEAKERn] tags "
                    f"({', '.join(tags)}) but the book gives no characters",
                )
            if missing:
                raise BookInputError(
                    "characters",
                    f"characters: no voice for {', '.join(missing)}, used in chapter {chapter.index + 1} "
                    f"({chapter.title!r})",
                )

    def chunk(self, text: str) -> tuple[list[str], list[bool]]:
        """Normalised chunks of a chapter and, for each, whether it ends a paragraph (a longer pause).

        Paragraphs are chunked one by one so every chunk knows whether a paragraph ends with it; all three
        methods end a chunk at a paragraph break anyway. Chunks without a word ("* * *") are dropped: the
        model would only mumble them.
        """
        c = self.settings.chunking
        chunks: list[str] = []
        ends: list[bool] = []
        for paragraph in text.split("\n\n"):
            if c.method == "speaker":
                # Text books unwrap hard line breaks, so a turn's tag may sit mid-line; the speaker method
                # cuts at lines that start with a tag.
                paragraph = _TURN.sub(r"\n\1", paragraph).strip()
            pieces = [
                normalize_transcript(p) for p in chunk_text(paragraph, c.method, c.max_words, c.max_turns)
            ]
            pieces = [p for p in pieces if count_words(p) > 0]
            chunks += pieces
            ends += [k == len(pieces) - 1 for k in range(len(pieces))]
        return chunks, ends


def book_error_row(raw: dict, field_name: str, message: str) -> dict:
    """The one row a failed book leaves; later stages pass it through to the driver."""
    book_id = raw.get("book_id")
    shown = book_id if isinstance(book_id, str) else repr(book_id)
    return {
        **_book_fields(raw, shown, _safe_meta(raw, "title"), _safe_meta(raw, "author")),
        "kind": "book",
        "status": "error",
        "error": message,
        "error_field": field_name,
        "chapters": 0,
    }


def _book_fields(raw: dict, book_id: str, title: str | None, author: str | None) -> dict:
    language = raw.get("language")
    return {
        "id": book_id,
        "book_id": book_id,
        "title": title,
        "author": author,
        "language": language if isinstance(language, str) else None,
        "error": None,
        "error_field": None,
    }


def _meta(raw: dict, name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BookInputError(name, f"{name}: must be a string, got {type(value).__name__}")
    value = " ".join(value.split())
    if len(value) > _MAX_META_CHARS:
        raise BookInputError(name, f"{name}: is longer than {_MAX_META_CHARS} characters")
    return value or None


def _safe_meta(raw: dict, name: str) -> str | None:
    try:
        return _meta(raw, name)
    except BookInputError:
        return None


def _decode_json(value: object) -> object:
    # One JSONL column cannot mix strings and objects for Arrow, so a voice dict may also come as JSON text.
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _voice_columns(voice: object, where: str) -> dict:
    """A book voice as the dataset rules' columns: a name or profile -> `voice`, a clip -> `references`."""
    if isinstance(voice, str):
        if "," in voice:
            raise BookInputError(where, f"{where}: names one voice; use characters for several speakers")
        return {"voice": voice}
    if isinstance(voice, dict):
        return {"references": [{k: v for k, v in voice.items() if v is not None}]}
    raise BookInputError(
        where,
        f"{where}: must be a voice name, profile:NAME or {{audio, transcript}}, got {type(voice).__name__}",
    )


def _tag_number(tag: str) -> int:
    return int(tag[len("SPEAKER") :])
