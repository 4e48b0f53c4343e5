"""Render a manifest into audio + metadata: the product's main job.

python -m jobs.generate_dataset manifest=examples/manifest.jsonl output=outputs/dataset
python -m jobs.generate_dataset model=higgs_v2 runtime=cluster storage=s3 manifest=s3://b/m.parquet output=s3://b/run1
python -m jobs.generate_dataset --multirun generation.seed=1,2 output=outputs/sweep
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from jobs.common import (
    checked,
    checkpoint_spec,
    init_ray,
    redacted_yaml,
    require,
    run_output,
    storage_options,
)
from model.engine import EngineOptions
from pipeline.dataset_job import DatasetJob, Resources, run_dataset_job
from pipeline.manifest import ManifestRules
from pipeline.reader import manifest_files
from pipeline.references import FetchPolicy

GENERATION_DEFAULTS = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "ras_win_len",
    "ras_win_max_num_repeat",
    "seed",
)


def build_job(cfg: DictConfig) -> DatasetJob:
    """Everything checked that can be checked before a model loads; errors say which key to change."""
    options = storage_options(cfg)
    try:
        manifest_files(str(cfg.manifest), options)
    except (FileNotFoundError, ValueError) as exc:
        require(False, f"manifest={cfg.manifest!r}: {exc}")
    gen = cfg.generation
    try:
        rules = ManifestRules(
            voice_library=str(Path(cfg.voices.library).resolve()) if cfg.voices.library else None,
            max_text_chars=int(gen.max_text_chars),
            default_response_format=str(gen.response_format),
            defaults={k: gen[k] for k in GENERATION_DEFAULTS},
        )
    except ValueError as exc:
        require(False, f"generation: {exc}")
    runtime = cfg.runtime
    for key in ("actors", "batch_size", "cpu_stage_workers"):
        require(int(runtime[key]) >= 1, f"runtime.{key} must be at least 1, got {runtime[key]}")
    require(float(runtime.gpus_per_actor) >= 0, "runtime.gpus_per_actor must be >= 0")
    roots = tuple(str(Path(p).resolve()) for p in cfg.voices.allowed_roots or ())
    return DatasetJob(
        manifest=str(cfg.manifest),
        output=run_output(cfg),
        checkpoint=checkpoint_spec(cfg.model, options),
        engine=EngineOptions(
            max_batch_size=int(runtime.batch_size),
            reference_cache_size=int(gen.engine.reference_cache_size),
            max_reference_seconds=float(gen.engine.max_reference_seconds),
            ras_enabled=bool(gen.engine.ras_enabled),
        ),
        rules=rules,
        fetch=FetchPolicy(
            allowed_roots=roots,
            allow_private_urls=bool(cfg.voices.allow_private_urls),
            timeout_s=float(cfg.voices.fetch_timeout_s),
            max_bytes=int(cfg.voices.max_bytes),
            storage_options=options,
        ),
        resources=Resources(
            actors=int(runtime.actors),
            gpus_per_actor=float(runtime.gpus_per_actor),
            cpus_per_actor=float(runtime.cpus_per_actor),
            batch_size=int(runtime.batch_size),
            cpu_stage_workers=int(runtime.cpu_stage_workers),
            cpu_stage_cpus=float(runtime.cpu_stage_cpus),
        ),
        storage_options=options,
        retry_errors=bool(cfg.retry_errors),
        config_yaml=redacted_yaml(cfg),
    )


@hydra.main(version_base=None, config_path="../conf", config_name="generate_dataset")
def main(cfg: DictConfig) -> dict:
    job = checked(build_job, cfg)
    init_ray(cfg.runtime)
    summary = run_dataset_job(job)
    root = summary["output"].rstrip("/")
    run = summary["this_run"]
    print(f"rows this run: {run['rows']} {run['by_status']}, {run['audio_seconds']} s of audio")
    print(f"audio:    {root}/audio/")
    print(f"metadata: {root}/metadata/ (all rows) and {root}/metadata.parquet (AudioFolder index)")
    print(f"summary:  {root}/summary.json")
    return summary


if __name__ == "__main__":
    main()
