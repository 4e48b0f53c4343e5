"""Rendered chapters -> ACX-mastered MP3s and their QC (CPU).

The chunks are read back from storage rather than carried through the graph: a chapter's audio is large,
and a resumed chapter's early chunks only exist there anyway. QC is measured on the decoded MP3, because
that file, not our float signal, is what ACX checks.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf

from pipeline.book_layout import chapter_key, chunk_key
from pipeline.export import ACX_RATE, FFmpegError, decode, encode_mp3
from pipeline.mastering import Pauses, master_chapter, measure_qc, stitch
from pipeline.stages import pack, unpack
from pipeline.storage import Storage


@dataclass
class Mastering:
    pauses: Pauses = field(default_factory=Pauses)
    target_rms_db: float = -20.0  # ACX: -23..-18 dBFS RMS
    peak_ceiling_db: float = -3.5  # ACX: <= -3 dBFS; the margin absorbs MP3 overshoot
    noise_floor_db: float = -65.0  # ACX: <= -60 dBFS
    mp3_bitrate_kbps: int = 192  # ACX: 192 kbps CBR or more
    m4b_bitrate_kbps: int = 64


@dataclass
class MasterSettings:
    output: str
    storage_options: dict | None = None
    mastering: Mastering = field(default_factory=Mastering)


class MasterStage:
    """Stitch a chapter's chunks with pauses, master it, encode the MP3 and measure it."""

    def __init__(self, settings: MasterSettings) -> None:
        self.settings = settings
        self.storage = Storage(settings.output, settings.storage_options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = unpack(batch)
        for i, row in enumerate(rows):
            if row["status"] != "rendered":
                continue
            try:
                rows[i] = self.master(row)
            except (FFmpegError, RuntimeError, ValueError) as exc:  # sf/ffmpeg errors are RuntimeErrors
                message = f"chapter {row['chapter']} ({row['chapter_title']!r}): mastering failed: {exc}"
                rows[i] = {**row, "status": "error", "error": message, "error_field": "mastering"}
        return pack(rows)

    def master(self, row: dict) -> dict:
        m = self.settings.mastering
        audio, rate = self.stitched(row)
        mastered = master_chapter(
            audio,
            rate,
            m.pauses,
            target_rms_db=m.target_rms_db,
            peak_ceiling_db=m.peak_ceiling_db,
            noise_floor_db=m.noise_floor_db,
        )
        key = chapter_key(row["book_id"], row["chapter"])
        tags = {
            "title": row["chapter_title"],
            "artist": row["author"],
            "album_artist": row["author"],
            "album": row["title"],
            "track": f"{row['chapter']}/{row['chapters']}",
            "genre": "Audiobook",
            "language": row.get("language"),
        }
        with tempfile.TemporaryDirectory(prefix="chapter-") as tmp:
            path = encode_mp3(mastered, ACX_RATE, Path(tmp) / "chapter.mp3", m.mp3_bitrate_kbps, tags)
            decoded, decoded_rate = decode(path)
            qc = measure_qc(decoded, decoded_rate)
            self.storage.write_bytes(key, path.read_bytes())
        return {
            **row,
            "status": "ok",
            "mp3_key": key,
            "duration_s": qc.duration_s,
            "qc": asdict(qc),
        }

    def stitched(self, row: dict) -> tuple[np.ndarray, int]:
        """The chapter's chunks in order, a sentence pause between them and a longer one after paragraphs."""
        pauses = self.settings.mastering.pauses
        waves, rate = [], None
        for k in range(row["n_chunks"]):
            data = self.storage.read_bytes(chunk_key(row["book_id"], row["chapter"], k, "wav"))
            wave, chunk_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
            if rate is not None and chunk_rate != rate:
                raise ValueError(f"chunk {k} is at {chunk_rate} Hz, the chapter's first chunk at {rate} Hz")
            rate = chunk_rate
            waves.append(wave)
        ends = row["paragraph_ends"]
        gaps = [pauses.paragraph_s if ends[k] else pauses.sentence_s for k in range(len(waves) - 1)]
        return stitch(waves, rate, gaps), rate
