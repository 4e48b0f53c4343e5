"""Regenerate an evaluation set with a checkpoint, laid out for the set's own scorer, optionally scored.

python -m jobs.regenerate_eval eval_set=seedtts meta=examples/eval/meta.lst language=en output=outputs/eval
python -m jobs.regenerate_eval eval_set=emergent meta=examples/eval/emergent.jsonl voice=en_woman output=...
python -m jobs.regenerate_eval eval_set=manifest meta=examples/manifest.jsonl output=outputs/eval-manifest
python -m jobs.regenerate_eval --multirun generation.temperature=0.7,1.0 generation.seed=1,2 output=...
python -m jobs.regenerate_eval scoring.enabled=true sample_rate=16000 ...   # WER/SIM into summary.json
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from jobs.common import checked, flag, init_ray, number, require, run_output, storage_options
from jobs.generate_dataset import build_job
from pipeline.eval_job import EMERGENT, EVAL_SETS, MANIFEST, SEEDTTS, EvalJob, prepare_inputs, run_eval_job
from pipeline.eval_scoring import ScoringOptions, format_scores

SAMPLE_RATES = (16000, 22050, 24000, 44100, 48000)


def build_eval_job(cfg: DictConfig) -> EvalJob:
    """Check the eval keys, write the set's manifest, then build the dataset job as generate_dataset does."""
    eval_set = str(cfg.eval_set)
    require(eval_set in EVAL_SETS, f"eval_set={eval_set!r}; use one of {', '.join(EVAL_SETS)}")
    require(bool(cfg.meta), "meta is empty; pass meta=PATH_OR_URI of the set's file")
    rate = cfg.sample_rate
    require(rate in SAMPLE_RATES, f"sample_rate={rate!r}; use one of {', '.join(map(str, SAMPLE_RATES))}")
    if eval_set != MANIFEST:
        # The scorers look for <name>.wav, so the bytes must be WAV too.
        fmt = str(cfg.generation.response_format)
        require(fmt == "wav", f"generation.response_format={fmt!r}; eval_set={eval_set} writes wav")
    voice = _voice(cfg)
    require(voice is None or eval_set == EMERGENT, f"voice is only used with eval_set={EMERGENT}")
    scoring = _scoring(cfg)
    options = storage_options(cfg)
    try:
        inputs = prepare_inputs(
            eval_set,
            str(cfg.meta),
            run_output(cfg, options),
            options,
            voice=voice,
            language=cfg.language,
        )
    except (FileNotFoundError, ValueError) as exc:
        require(False, f"meta={cfg.meta!r}: {exc}")
    with open_dict(cfg):
        cfg.manifest = inputs.manifest  # what generate_dataset's checks and config.yaml see
    return EvalJob(dataset=build_job(cfg), inputs=inputs, sample_rate=rate, scoring=scoring)


def _voice(cfg: DictConfig) -> str | dict | None:
    voice = cfg.voice
    if voice is None:
        return None
    if isinstance(voice, str):
        library = cfg.voices.library
        require(bool(library), f"voice={voice!r} names a library voice but voices.library is empty")
        require((Path(library) / f"{voice}.wav").is_file(), f"voice={voice!r} is not in {library}")
        return voice
    value = OmegaConf.to_container(voice, resolve=True)
    require(
        isinstance(value, dict) and isinstance(value.get("audio"), str) and bool(value["audio"]),
        "voice must be a library name or {audio: PATH_OR_URI, transcript: TEXT}",
    )
    audio = value["audio"]
    if "://" not in audio and not audio.startswith("data:"):
        require(os.path.isfile(audio), f"voice.audio={audio!r} is not a file")
    return value


def _scoring(cfg: DictConfig) -> ScoringOptions:
    sc = cfg.scoring
    opts = ScoringOptions(
        enabled=flag(sc, "enabled"),
        asr_model=str(sc.asr_model),
        sv_model=str(sc.sv_model),
        language=cfg.language,
        actors=number(sc, "actors", int, 1),
        gpus_per_actor=number(sc, "gpus_per_actor", float, 0.0),
        cpus_per_actor=number(sc, "cpus_per_actor", float, 0.0),
        batch_size=number(sc, "batch_size", int, 1),
        device=sc.device,
    )
    if opts.enabled:
        from pipeline.scoring import unloadable

        for key, kind in (("asr_model", "asr"), ("sv_model", "sv")):
            model = getattr(opts, key)
            reason = unloadable(model, kind)
            require(
                reason is None,
                f"scoring.{key}={model!r} cannot be loaded ({reason}); offline (HF_HUB_OFFLINE=1) it must be "
                "in the Hugging Face cache, or pass a local folder",
            )
    return opts


@hydra.main(version_base=None, config_path="../conf", config_name="regenerate_eval")
def main(cfg: DictConfig) -> dict:
    job = checked(build_eval_job, cfg)
    init_ray(cfg.runtime)
    summary = run_eval_job(job)
    root = summary["output"].rstrip("/")
    run = summary["this_run"]
    print(f"rows this run: {run['rows']} {run['by_status']}, {run['audio_seconds']} s of audio")
    if job.inputs.bad_lines:
        print(f"bad lines: {job.inputs.bad_lines} (error rows in {root}/metadata/, with line_number)")
    layout = {SEEDTTS: "<utt>.wav", EMERGENT: "<index>.wav"}.get(job.inputs.eval_set, "audio/<id>.<ext>")
    print(f"audio:    {root}/{layout} at {job.sample_rate} Hz")
    print(f"summary:  {root}/summary.json")
    if "scores" in summary:
        print(f"scores:   {summary['scores']['files']}/")
        print(format_scores(summary["scores"]))
    return summary


if __name__ == "__main__":
    main()
