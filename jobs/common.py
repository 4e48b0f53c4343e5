"""What every job does with its config: check it early, build the checkpoint spec, start Ray."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from model.options import MIN_REFERENCE_SECONDS, CheckpointSpec, is_remote_uri
from pipeline.lease import holder
from pipeline.reader import iter_ids
from pipeline.secrets import redact, scrub, secret_values
from pipeline.storage import Storage

T = TypeVar("T")


class ConfigError(SystemExit):
    """A configuration problem, reported before any model is loaded; exits with status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(f"configuration error: {message}")
        self.code = 2


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def flag(section: DictConfig, key: str, default: bool | None = None, nullable: bool = False) -> bool | None:
    """A true/false setting, checked: bool("flase") would be true."""
    value = section.get(key, default)
    allowed = "true, false or null" if nullable else "true or false"
    require(
        isinstance(value, bool) or (nullable and value is None),
        f"{section._get_full_key(key)}={value!r} must be {allowed}",
    )
    return value


def number(section: DictConfig, key: str, kind: type, low: float | None = None, optional: bool = False):
    """A count (kind int) or an amount (float) setting, checked, at least `low`; None where `optional`."""
    value = section.get(key)
    if value is None and optional:
        return None
    name = f"{section._get_full_key(key)}={value!r}"
    try:
        result = kind(value)
        ok = not isinstance(value, bool) and (kind is float or float(value) == result)
    except (TypeError, ValueError):
        ok = False
    require(ok, f"{name} must be {'an integer' if kind is int else 'a number'}")
    require(low is None or result >= low, f"{name} must be at least {low}")
    return result


def checked(build: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run a job's config checks; on a ConfigError say why on stderr (SystemExit prints nothing for an
    integer code) and exit with status 2."""
    try:
        return build(cfg)
    except ConfigError as exc:
        print(exc.args[0], file=sys.stderr)
        raise


def checkpoint_spec(model: DictConfig, storage_options: dict | None) -> CheckpointSpec:
    source = str(model.source)
    require(bool(source), "model.source is empty; use model=tiny or model=higgs_v2, or set model.source=PATH")
    if model.get("build_tiny"):
        folder = Path(source)
        if not (folder / "config.json").exists():
            from model.tiny import build_tiny_checkpoint

            build_tiny_checkpoint(folder)
        source = str(folder.resolve())
    elif source.startswith((".", "/")) and not is_remote_uri(source):
        require(
            Path(source).is_dir(),
            f"model.source={source!r} is not a folder; pass a hub id, folder or s3:// URI",
        )
    try:
        return CheckpointSpec(
            source=source,
            audio_tokenizer=model.get("audio_tokenizer"),
            device=model.get("device"),
            dtype=model.get("dtype"),
            attn_implementation=model.get("attn_implementation"),
            cache_dir=model.get("cache_dir"),
            storage_options=storage_options if is_remote_uri(source) else None,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def storage_options(cfg: DictConfig) -> dict | None:
    options = OmegaConf.to_container(cfg.storage.options, resolve=True) or {}
    return {k: v for k, v in options.items() if v is not None} or None


def redacted_yaml(cfg: DictConfig) -> str:
    """The resolved config with secret-looking values masked, for <output>/config.yaml and logs."""
    container = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.to_yaml(OmegaConf.create(redact(container)))


def init_ray(runtime: DictConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME") if k in os.environ}
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        # A Ray Jobs driver: ray.init refuses to set a variable the job's runtime env (jobs/submit.py
        # forwards these) already sets, so only the others are added.
        job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        env = {k: v for k, v in env.items() if k not in job_env}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    if runtime.address:
        ray.init(address=runtime.address, **kwargs)
    else:
        cpus = number(runtime, "num_cpus", int, 1, optional=True)  # checked with the job (resources)
        ray.init(num_cpus=cpus, include_dashboard=False, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = flag(runtime, "progress_bars", False)


def readable_manifest(cfg: DictConfig, key: str, storage_options: dict | None, column: str = "id") -> str:
    """`cfg.<key>`, a manifest whose `column` has been read: a missing, unreadable or unparsable one fails
    here, before Ray starts."""
    uri = str(cfg[key])
    try:
        for _ in iter_ids(uri, storage_options, column=column):
            pass
    except (FileNotFoundError, ValueError) as exc:  # pyarrow's parse errors are ValueErrors too
        require(False, f"{key}={uri!r}: {exc}")
    return uri


def run_output(cfg: DictConfig, storage_options: dict | None) -> str:
    """The output URI of this run, checked writable and not in use by another run (pipeline.lease): in a
    --multirun sweep each job gets <output>/<its overrides>."""
    output = _run_output(cfg)
    try:
        storage = Storage(output, storage_options, retries=2)
        storage.check_writable()
        busy = holder(storage)
    except Exception as exc:  # noqa: BLE001 - whatever stops the write (SDKs raise their own types) is the answer
        reason = scrub(f"{type(exc).__name__}: {exc}", secret_values(storage_options or {}))
        require(False, f"output={output!r} cannot be written: {reason}")
    require(busy is None, f"output={output!r}: {busy}")
    return output


def _run_output(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    output = str(cfg.output)
    require(bool(output), "output is empty; pass output=PATH_OR_URI")
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return output
    if hydra_cfg.mode == RunMode.MULTIRUN:
        name = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
        return output.rstrip("/") + "/" + name.replace("/", "_").replace(",", "_")
    return output


GENERATION_DEFAULTS = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "ras_win_len",
    "ras_win_max_num_repeat",
    "seed",
)


def manifest_rules(cfg: DictConfig, **extra):
    """The row rules every job validates its requests with, from `voices.library` and `generation.*`."""
    from pipeline.manifest import ManifestRules

    gen = cfg.generation
    try:
        return ManifestRules(
            voice_library=str(Path(cfg.voices.library).resolve()) if cfg.voices.library else None,
            max_text_chars=number(gen, "max_text_chars", int, 1),
            defaults={k: gen[k] for k in GENERATION_DEFAULTS},
            **extra,
        )
    except ValueError as exc:
        raise ConfigError(f"generation: {exc}") from exc


def engine_options(cfg: DictConfig):
    from model.options import EngineOptions

    engine = cfg.generation.engine
    values = dict(
        max_batch_size=batch_size(cfg.runtime),
        reference_cache_size=number(engine, "reference_cache_size", int, 0),
        max_reference_seconds=number(engine, "max_reference_seconds", float, MIN_REFERENCE_SECONDS),
        ras_enabled=flag(engine, "ras_enabled"),
        static_cache=flag(engine, "static_cache"),
        cuda_graphs=flag(engine, "cuda_graphs"),
        compile=flag(engine, "compile"),
        fused_norms=flag(engine, "fused_norms"),
        fused_projections=flag(engine, "fused_projections"),
        int8_weights=flag(engine, "int8_weights"),
        share_prefix=flag(engine, "share_prefix"),
        shared_prefix_cache=flag(engine, "shared_prefix_cache"),
        vocode_windows=flag(engine, "vocode_windows", nullable=True),
        overlap_vocoding=flag(engine, "overlap_vocoding"),
        overlap_prefill=flag(engine, "overlap_prefill"),
        reserve=kv_reserve(engine.reserve),
    )
    try:
        return EngineOptions(**values)
    except ValueError as exc:  # settings that exclude each other
        raise ConfigError(str(exc)) from exc


def _is_count(value: object) -> bool:
    """A whole number of at least 1 (YAML's true is not one)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def kv_reserve(value: object) -> str | int:
    """generation.engine.reserve, checked: estimate, max_new_tokens, or a count of frames."""
    require(
        _is_count(value) or value in ("estimate", "max_new_tokens"),
        f"generation.engine.reserve must be estimate, max_new_tokens or a count of frames, got {value!r}",
    )
    return value


def batch_size(runtime: DictConfig) -> int:
    """runtime.batch_size as the engine takes it: a count, or 0 for `auto` (the largest batch that fits)."""
    value = runtime.batch_size
    if value == "auto":
        return 0
    require(
        _is_count(value),
        f"runtime.batch_size must be a count of rows, or auto, got {value!r}",
    )
    return value


def resources(runtime: DictConfig):
    """How the graph spreads over the cluster, checked: counts at least 1, GPUs not negative."""
    from pipeline.dataset_job import Resources

    size = batch_size(runtime)
    number(runtime, "num_cpus", int, 1, optional=True)  # a local Ray's CPUs (init_ray); null: all
    rows_per_call = number(runtime, "rows_per_call", int, 1, optional=True)  # null: 4 x runtime.batch_size
    return Resources(
        actors=number(runtime, "actors", int, 1),
        gpus_per_actor=number(runtime, "gpus_per_actor", float, 0.0),
        cpus_per_actor=number(runtime, "cpus_per_actor", float, 0.0),
        batch_size=size,
        rows_per_call=rows_per_call or 0,
        cpu_stage_workers=number(runtime, "cpu_stage_workers", int, 1),
        cpu_stage_cpus=number(runtime, "cpu_stage_cpus", float, 0.0),
        # null, or a runtime config from before the key: the default
        io_threads=number(runtime, "io_threads", int, 1, optional=True) or Resources.io_threads,
    )


def allowed_roots(section: DictConfig) -> tuple[str, ...]:
    """A section's `allowed_roots`, resolved. Only a list (or null: none) is taken: a string would be
    iterated character by character, and the "/" of `voices.allowed_roots=examples/voices` would allow
    every file."""
    roots = section.get("allowed_roots")
    if roots is None:
        return ()
    key = section._get_full_key("allowed_roots")
    require(not isinstance(roots, str), f"{key}={roots!r} must be a list of folders: {key}=[{roots}]")
    require(
        OmegaConf.is_list(roots) and all(isinstance(p, str) and p.strip() for p in roots),
        f"{key}={roots!r} must be a list of folder paths, none of them blank",
    )
    return tuple(str(Path(p).resolve()) for p in roots)


def fetch_policy(section: DictConfig, options: dict | None):
    """Where reference audio (or book sources) may be read from: a `voices`-style config section."""
    from pipeline.references import FetchPolicy

    return FetchPolicy(
        allowed_roots=allowed_roots(section),
        allow_private_urls=flag(section, "allow_private_urls"),
        timeout_s=number(section, "fetch_timeout_s", float, 0.1),
        max_bytes=number(section, "max_bytes", int, 1),
        storage_options=options,
    )
