"""MP3 / M4B export and read-back, all through the real ffmpeg binary that imageio-ffmpeg ships.

There is no ffprobe in that package, so ``probe`` asks ffmpeg itself: ``ffmpeg -i FILE`` prints the
same libavformat demuxer's view of the file that ffprobe would (duration, bit rate, streams), and
``-f ffmetadata -`` dumps its tags and chapters in FFmpeg's documented FFMETADATA1 text format.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

ACX_RATE = 44100
_COVER_EXT = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/png": ".png"}


class FFmpegError(RuntimeError):
    """ffmpeg exited non-zero; the message carries the tail of its stderr, which says why."""


def ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def _run(args: list[str], what: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    # -nostdin: ffmpeg otherwise reads the terminal for keys and can stall or eat a parent's stdin.
    cmd = [ffmpeg_exe(), "-hide_banner", *([] if stdin is not None else ["-nostdin"]), *args]
    try:
        return subprocess.run(cmd, input=stdin, check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        tail = "\n".join(exc.stderr.decode("utf-8", "replace").strip().splitlines()[-15:])
        raise FFmpegError(f"ffmpeg failed to {what} (exit {exc.returncode}):\n{tail}") from exc


def _part_path(out: Path) -> Path:
    # Write beside the target and rename: a crash never leaves a truncated file under the final name.
    return out.with_name(f".{out.name}.part")


def _metadata_args(tags: dict[str, object] | None) -> list[str]:
    args: list[str] = []
    for key, value in (tags or {}).items():
        if value is not None:
            args += ["-metadata", f"{key}={value}"]
    return args


def encode_mp3(
    audio: np.ndarray,
    sample_rate: int,
    out_path: PathLike,
    bitrate_kbps: int = 192,
    tags: dict[str, object] | None = None,
    max_peak_db: float | None = -3.0,
) -> Path:
    """Encode mono float audio to CBR MP3 at 44.1 kHz (ACX: 192 kbps CBR or better), with ID3v2 tags.

    ``tags`` keys are ffmpeg metadata names: title, artist, album, track (e.g. "3" or "3/12"), ...
    With ``max_peak_db`` set, the decoded MP3's sample peak is checked and, if the codec pushed it
    over, the chapter is re-encoded that much quieter (ACX measures the file it receives, not ours).
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(out)
    mono = np.asarray(audio, dtype=np.float32).reshape(-1)
    args = ["-y", "-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", "pipe:0"]
    # -b:a without -q:a/-abr is constant bit rate in libmp3lame; ACX rejects VBR.
    args += ["-ar", str(ACX_RATE), "-ac", "1", "-c:a", "libmp3lame", "-b:a", f"{bitrate_kbps}k"]
    # ID3v2.3 is what most players and ACX's uploader read; v2.4 is still patchy.
    args += ["-id3v2_version", "3", *_metadata_args(tags), "-f", "mp3", str(part)]
    gain_db = 0.0
    try:
        for _ in range(4):
            pcm = np.ascontiguousarray(mono * np.float32(10 ** (gain_db / 20)), dtype="<f4").tobytes()
            _run(args, f"encode MP3 {out}", stdin=pcm)
            if max_peak_db is None:
                break
            peak_db = _astats(part)[1]
            if peak_db <= max_peak_db:
                break
            # MP3 quantisation noise rides on peaks already at the limiter ceiling (+0.7 dB seen at
            # -3.5 dBFS); a fraction of a dB off the whole chapter keeps its RMS well inside ACX's range.
            gain_db -= peak_db - max_peak_db + 0.1
            logger.info(
                "MP3 peak %.2f dBFS over %.2f: re-encoding %s at %.2f dB", peak_db, max_peak_db, out, gain_db
            )
        else:
            raise FFmpegError(f"MP3 peak of {out} stays above {max_peak_db} dBFS after gain {gain_db:.2f} dB")
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def _astats(path: PathLike, sample_rate: int | None = None) -> tuple[int, float]:
    """(sample count, sample peak dBFS) of the decoded first audio stream, at ``sample_rate`` if given.

    astats measures while ffmpeg decodes to nowhere, so an hour-long chapter needs no memory here.
    """
    filt = "astats=measure_perchannel=none:measure_overall=Peak_level+Number_of_samples"
    if sample_rate:
        filt = f"aresample={sample_rate},{filt}"
    proc = _run(
        ["-i", str(path), "-map", "0:a:0", "-ac", "1", "-af", filt, "-f", "null", "-"], f"decode {path}"
    )
    report = proc.stderr.decode("utf-8", "replace")
    count = re.findall(r"Number of samples:\s*(\d+)", report)
    peak = re.findall(r"Peak level dB:\s*(-?inf|[-\d.]+)", report)
    if not count or not peak:
        raise FFmpegError(f"ffmpeg printed no audio statistics for {path}")
    return int(count[-1]), float(peak[-1])


def decoded_samples(path: PathLike, sample_rate: int = ACX_RATE) -> int:
    """Exact sample count of the decoded audio (encoder delay/padding trimmed) at ``sample_rate``."""
    return _astats(path, sample_rate)[0]


def _escape_ffmeta(value: str) -> str:
    # FFMETADATA1 reserves these; unescaped they silently truncate or split a title. Titles are one
    # line anyway, and ffmpeg 9's reader drops the whole [CHAPTER] when a value ends in an escaped
    # backslash, so line breaks become spaces and trailing backslashes go.
    value = " ".join(value.split()).rstrip("\\")
    return re.sub(r"([=;#\\])", r"\\\1", value)


def build_m4b(
    chapter_files: Sequence[PathLike],
    chapter_titles: Sequence[str],
    out_path: PathLike,
    title: str,
    author: str,
    cover: bytes | None = None,
    cover_mime: str | None = None,
    bitrate_kbps: int = 64,
) -> Path:
    """Concatenate chapter audio into one AAC .m4b with chapter markers, tags and optional cover art."""
    if not chapter_files or len(chapter_files) != len(chapter_titles):
        raise ValueError(
            f"need one title per chapter file, got {len(chapter_files)} files, {len(chapter_titles)} titles"
        )
    if cover is not None and cover_mime not in _COVER_EXT:
        raise ValueError(f"cover must be JPEG or PNG (mp4 'covr' atom), got {cover_mime!r}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    # Marks come from what the decoder really yields (encoder delay/padding trimmed), so they line up
    # with the concatenated stream sample-for-sample instead of drifting with nominal lengths.
    lines = [";FFMETADATA1", f"title={_escape_ffmeta(title)}", f"artist={_escape_ffmeta(author)}"]
    lines += [f"album={_escape_ffmeta(title)}", f"album_artist={_escape_ffmeta(author)}", "genre=Audiobook"]
    start = 0
    for path, chapter_title in zip(chapter_files, chapter_titles, strict=True):
        end = start + decoded_samples(path)
        lines += ["[CHAPTER]", "TIMEBASE=1/1000", f"START={start * 1000 // ACX_RATE}"]
        lines += [f"END={end * 1000 // ACX_RATE}", f"title={_escape_ffmeta(chapter_title)}"]
        start = end

    n = len(chapter_files)
    with tempfile.TemporaryDirectory(prefix="m4b-") as tmp:
        meta = Path(tmp) / "chapters.ffmeta"
        meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
        args = ["-y"]
        for path in chapter_files:
            args += ["-i", str(path)]
        args += ["-f", "ffmetadata", "-i", str(meta)]
        if cover is not None:
            img = Path(tmp) / f"cover{_COVER_EXT[cover_mime]}"
            img.write_bytes(cover)
            args += ["-i", str(img)]
        # Same rate/layout on every concat input, whatever each chapter file was encoded as.
        norm = "".join(f"[{i}:a:0]aresample={ACX_RATE},aformat=channel_layouts=mono[a{i}];" for i in range(n))
        concat = "".join(f"[a{i}]" for i in range(n)) + f"concat=n={n}:v=0:a=1[out]"
        args += ["-filter_complex", norm + concat, "-map", "[out]"]
        if cover is not None:
            # Copied as-is: the mp4 'covr' atom stores the JPEG/PNG bytes, re-encoding would only lose.
            args += ["-map", f"{n + 1}:v:0", "-c:v", "copy", "-disposition:v:0", "attached_pic"]
        args += ["-map_metadata", str(n), "-map_chapters", str(n)]
        args += ["-c:a", "aac", "-b:a", f"{bitrate_kbps}k", "-ar", str(ACX_RATE), "-ac", "1"]
        # ipod muxer = MP4 with the M4A/M4B brand Apple Books and audiobook players expect;
        # faststart puts the index first so players can seek before the whole file arrives.
        part = _part_path(out)
        args += ["-movflags", "+faststart", "-f", "ipod", str(part)]
        try:
            _run(args, f"build M4B {out}")
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
    return out


def _unescape_ffmeta(text: str) -> list[str]:
    """Split FFMETADATA text into logical lines, resolving backslash escapes (incl. escaped newlines)."""
    lines, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            # Keep a marker so key=value splitting ignores escaped '='.
            cur.append("\0" + text[i + 1])
            i += 2
            continue
        if ch == "\n":
            lines.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    if cur:
        lines.append("".join(cur))
    return lines


def _parse_ffmetadata(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    tags: dict[str, str] = {}
    sections: list[tuple[str, dict[str, str]]] = []
    target = tags
    for raw in _unescape_ffmeta(text):
        if not raw or raw[0] in ";#":
            continue
        if raw.startswith("[") and raw.endswith("]"):
            target = {}
            sections.append((raw[1:-1], target))
            continue
        key, sep, value = raw.partition("=")
        if sep:
            target[key.replace("\0", "")] = value.replace("\0", "")
    return tags, [sec for name, sec in sections if name == "CHAPTER"]


def _input_report(stderr: str) -> str:
    # ffmpeg echoes metadata again for the output; only the "Input #0" block describes the file.
    start = stderr.find("Input #0")
    if start < 0:
        return ""
    stop = min(
        (i for i in (stderr.find("Stream mapping:"), stderr.find("Output #0")) if i > start), default=None
    )
    return stderr[start:stop]


_STREAM = re.compile(r"Stream #0:(\d+)\S*: (Audio|Video|Subtitle|Data|Attachment): ([^\n]*)")


def _parse_input_report(report: str) -> dict:
    info: dict = {"duration_s": None, "bit_rate_kbps": None, "streams": []}
    if m := re.search(r"Input #0, (.+?), from", report):
        info["format"] = m.group(1)
    if m := re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", report):
        h, mnt, s = m.groups()
        info["duration_s"] = int(h) * 3600 + int(mnt) * 60 + float(s)
    if m := re.search(r"Duration:.*?bitrate: (\d+) kb/s", report):
        info["bit_rate_kbps"] = int(m.group(1))
    for m in _STREAM.finditer(report):
        index, kind, desc = int(m.group(1)), m.group(2), m.group(3)
        stream = {
            "index": index,
            "type": kind.lower(),
            "codec": desc.split()[0].rstrip(","),
            "attached_pic": "(attached pic)" in desc,
        }
        if kind == "Audio":
            rate = re.search(r"(\d+) Hz", desc)
            layout = re.search(r"Hz, ([^,]+)", desc)
            brate = re.search(r"(\d+) kb/s", desc)
            stream["sample_rate"] = int(rate.group(1)) if rate else None
            stream["channels"] = _channels(layout.group(1).strip()) if layout else None
            stream["bit_rate_kbps"] = int(brate.group(1)) if brate else None
        info["streams"].append(stream)
    return info


def _channels(layout: str) -> int | None:
    named = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "5.0": 5, "5.1": 6, "7.1": 8}
    if layout.split("(")[0] in named:
        return named[layout.split("(")[0]]
    m = re.match(r"(\d+) channels", layout)
    return int(m.group(1)) if m else None


def probe(path: PathLike) -> dict:
    """Duration, rate, channels, bit rates, codec, tags and chapters of a media file.

    Uses ``ffmpeg -i`` (the libavformat demuxer ffprobe wraps) plus ``-f ffmetadata -`` for tags and
    chapters, since imageio-ffmpeg ships no ffprobe. Keys: format, duration_s, bit_rate_kbps (whole
    file), codec, sample_rate, channels, audio_bit_rate_kbps (first audio stream), streams, has_cover,
    tags, chapters ([{title, start_s, end_s, tags}]).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    proc = _run(["-i", str(path), "-f", "ffmetadata", "-"], f"probe {path}")
    info = _parse_input_report(_input_report(proc.stderr.decode("utf-8", "replace")))
    tags, chapters = _parse_ffmetadata(proc.stdout.decode("utf-8", "replace"))
    audio = next((s for s in info["streams"] if s["type"] == "audio"), {})
    info.update(
        codec=audio.get("codec"),
        sample_rate=audio.get("sample_rate"),
        channels=audio.get("channels"),
        audio_bit_rate_kbps=audio.get("bit_rate_kbps"),
        has_cover=any(s["attached_pic"] for s in info["streams"]),
        tags=tags,
        chapters=[_chapter(c) for c in chapters],
    )
    return info


def _chapter(raw: dict[str, str]) -> dict:
    num, _, den = raw.get("TIMEBASE", "1/1000").partition("/")
    scale = int(num) / int(den or 1)
    extra = {k: v for k, v in raw.items() if k not in ("TIMEBASE", "START", "END")}
    return {
        "title": raw.get("title"),
        "start_s": round(int(raw["START"]) * scale, 6),
        "end_s": round(int(raw["END"]) * scale, 6),
        "tags": extra,
    }


def decode(path: PathLike) -> tuple[np.ndarray, int]:
    """Decode the first audio stream to float32 mono at its own sample rate (e.g. to QC an MP3)."""
    proc = _run(
        ["-i", str(path), "-map", "0:a:0", "-ac", "1", "-c:a", "pcm_f32le", "-f", "f32le", "-"],
        f"decode {path}",
    )
    info = _parse_input_report(_input_report(proc.stderr.decode("utf-8", "replace")))
    rate = next((s["sample_rate"] for s in info["streams"] if s["type"] == "audio"), None)
    if not rate:
        raise FFmpegError(f"could not read the sample rate of {path} from ffmpeg's report")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32), int(rate)
