"""Render a manifest into audio + metadata: the product's main job.

python -m jobs.generate_dataset manifest=examples/manifest.jsonl output=outputs/dataset
python -m jobs.generate_dataset model=higgs_v2 runtime=cluster storage=s3 manifest=s3://b/m.parquet output=s3://b/run1
python -m jobs.generate_dataset --multirun generation.seed=1,2 output=outputs/sweep
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs.common import (
    checked,
    checkpoint_spec,
    engine_options,
    fetch_policy,
    flag,
    init_ray,
    manifest_rules,
    readable_manifest,
    redacted_yaml,
    resources,
    run_output,
    storage_options,
)
from pipeline.dataset_job import DatasetJob, run_dataset_job


def build_job(cfg: DictConfig) -> DatasetJob:
    """Everything checked that can be checked before a model loads; errors say which key to change."""
    options = storage_options(cfg)
    manifest = readable_manifest(cfg, "manifest", options)
    rules = manifest_rules(cfg, default_response_format=str(cfg.generation.response_format))
    res = resources(cfg.runtime)
    return DatasetJob(
        manifest=manifest,
        output=run_output(cfg, options),
        checkpoint=checkpoint_spec(cfg.model, options),
        engine=engine_options(cfg),
        rules=rules,
        fetch=fetch_policy(cfg.voices, options),
        resources=res,
        storage_options=options,
        retry_errors=flag(cfg, "retry_errors"),
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
    index = f" and {root}/metadata.parquet (AudioFolder index)" if summary["audiofolder_rows"] else ""
    print(f"metadata: {root}/metadata/ (all rows){index}")
    print(f"summary:  {root}/summary.json")
    return summary


if __name__ == "__main__":
    main()
