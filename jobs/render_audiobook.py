"""Render a books manifest into ACX-mastered chapter MP3s and one M4B per book.

python -m jobs.render_audiobook books=examples/books.jsonl output=outputs/audiobooks
python -m jobs.render_audiobook model=higgs_v2 runtime=cluster storage=s3 books=s3://b/books.parquet output=s3://b/ab
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from jobs.common import (
    checked,
    checkpoint_spec,
    engine_options,
    fetch_policy,
    init_ray,
    manifest_rules,
    number,
    readable_manifest,
    redacted_yaml,
    require,
    resources,
    run_output,
    storage_options,
)
from model.chunking import METHODS
from pipeline.audiobook_job import AudiobookJob, run_audiobook_job
from pipeline.book_stage import BookSettings, ChunkingSettings
from pipeline.master_stage import Mastering
from pipeline.mastering import Pauses

# libmp3lame's constant bit rates; anything else is silently rounded by the encoder.
MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)


def build_job(cfg: DictConfig) -> AudiobookJob:
    """Everything checked that can be checked before a model loads; errors say which key to change."""
    options = storage_options(cfg)
    books = readable_manifest(cfg, "books", options, column="book_id")
    rules = manifest_rules(cfg)

    chunking = cfg.chunking
    require(
        chunking.method in METHODS,
        f"chunking.method={chunking.method!r}; expected one of {', '.join(METHODS)}",
    )
    chunk_settings = ChunkingSettings(
        method=str(chunking.method),
        max_words=number(chunking, "max_words", int, 1, optional=True),
        max_turns=number(chunking, "max_turns", int, 1),
    )
    pauses = Pauses(
        **{
            k: number(cfg.pauses, k, float, 0.0)
            for k in ("sentence_s", "paragraph_s", "chapter_head_s", "chapter_tail_s")
        }
    )
    m = cfg.mastering
    mastering = Mastering(
        pauses=pauses,
        target_rms_db=number(m, "target_rms_db", float),
        peak_ceiling_db=number(m, "peak_ceiling_db", float),
        noise_floor_db=number(m, "noise_floor_db", float),
        mp3_bitrate_kbps=number(m, "mp3_bitrate_kbps", int),
        m4b_bitrate_kbps=number(m, "m4b_bitrate_kbps", int, 16),
    )
    require(
        mastering.noise_floor_db < mastering.target_rms_db < mastering.peak_ceiling_db <= 0,
        "mastering needs noise_floor_db < target_rms_db < peak_ceiling_db <= 0, got "
        f"{mastering.noise_floor_db} / {mastering.target_rms_db} / {mastering.peak_ceiling_db}",
    )
    require(
        mastering.mp3_bitrate_kbps in MP3_BITRATES,
        f"mastering.mp3_bitrate_kbps={mastering.mp3_bitrate_kbps} is not an MP3 bit rate ({MP3_BITRATES})",
    )

    res = resources(cfg.runtime)  # batch_size: chapters an engine renders together (auto: AUTO_CHAPTERS)
    return AudiobookJob(
        books=books,
        output=run_output(cfg, options),
        checkpoint=checkpoint_spec(cfg.model, options),
        book=BookSettings(
            output="",  # the job fills in its own output
            rules=rules,
            voices=fetch_policy(cfg.voices, options),
            sources=fetch_policy(cfg.sources, options),
            chunking=chunk_settings,
            max_book_words=number(cfg, "max_book_words", int, 1),
            base_dir=os.getcwd(),
        ),
        engine=engine_options(cfg),
        mastering=mastering,
        resources=res,
        buffer_size=number(cfg, "buffer_size", int, 0, optional=True),
        max_new_chunks=number(cfg, "max_new_chunks", int, 1, optional=True),
        storage_options=options,
        config_yaml=redacted_yaml(cfg),
    )


@hydra.main(version_base=None, config_path="../conf", config_name="render_audiobook")
def main(cfg: DictConfig) -> dict:
    job = checked(build_job, cfg)
    init_ray(cfg.runtime)
    summary = run_audiobook_job(job)
    root = summary["output"].rstrip("/")
    run = summary["this_run"]
    print(
        f"books this run: {run['books']} {run['by_status']}, {run['chapters']} chapters, "
        f"{run['chunks_generated']} chunks generated ({run['chunks_resumed']} resumed), "
        f"{run['audio_seconds']} s of audio"
    )
    print(f"books:    {root}/<book_id>/<book_id>.m4b, chapters/NNN.mp3, qc.csv")
    print(f"metadata: {root}/metadata/books-*.parquet")
    print(f"summary:  {root}/summary.json")
    return summary


if __name__ == "__main__":
    main()
