"""The dataset pipeline against the bare engine, and the driver's memory against manifest size, as JSON.

    python scripts/bench_pipeline.py                           # both parts, defaults (~6 min on 2 shared cores)
    python scripts/bench_pipeline.py --rows 500 --skip-memory  # throughput only
    python scripts/bench_pipeline.py --memory-rows 10000,100000 --skip-throughput

Tiny checkpoint (random weights, built into a temp folder), CPU. Each part runs in its own fresh process, started
from this one, which imports neither torch nor Ray, so a child's ru_maxrss starts at ~18 MB, not at its parent's peak.

1. Throughput: a manifest of --rows smart-voice rows (no voice, texts of 80-90 characters), every row with
   max_new_tokens=--max-new-tokens, and the engine's ignore_eos, so every row generates the same frames.
   (a) the bare engine in-process with torch.set_num_threads(k), k = the threads a Ray actor with --actor-cpus
   CPUs gets (max(1, floor(num_cpus)), checked with a probe actor), on the same requests, one engine call per
   --batch-size rows as SynthesizeStage makes them; (b) run_dataset_job on a fresh local Ray (--num-cpus) with
   one synthesis actor of --actor-cpus CPUs, the same batch size, CPU stages at --cpu-stage-cpus each, output
   to a temp folder. Reported: rows/s of both and their ratio; Ray Data's per-operator stats of the run; the
   fixed cost the pipeline adds (wall beyond the synthesis stage's own time) and the manifest size at which the
   ratio reaches 0.8; and a per-stage cost profile measured in-process on a sample of the same rows.
2. Driver memory: for each of --memory-rows, in a fresh process, run_dataset_job over a Parquet manifest whose
   rows all fail validation (an unknown voice), so nothing reaches the model and only the driver's streaming and
   bookkeeping are measured. Reported: ru_maxrss (KB) after imports + ray.init and after the run, VmHWM, RSS
   after each driver phase, wall time, rows/s through the CPU stages, and the ratio between the sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_report import emit  # noqa: E402

# Similar lengths (83-86 characters): prompts pad little and every row costs about the same.
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the narrator keeps a steady voice.",
    "A gentle rain fell on the old town square as the market stalls slowly began to open.",
    "She opened the letter by the window and read it twice before she said a single word.",
    "Every morning the baker lit the ovens long before the first light touched the hills.",
    "The train left the station on time, carrying tired travellers toward the distant sea.",
    "He tuned the old radio until a clear voice rose above the static of the winter night.",
]
FRAME_RATE = 25
LIST_FILES_CPUS = 1.0  # Ray Data's ListFiles task (read_parquet's DataSourceV2 path) asks for a whole CPU


# ---------------------------------------------------------------- helpers shared by the children


def memory_kb() -> dict:
    """ru_maxrss (peak RSS of this process, KB on Linux), VmHWM (peak of this address space) and VmRSS."""
    out = {"ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                out[line.split(":")[0].lower() + "_kb"] = int(line.split()[1])
    except OSError:
        pass
    return out


def init_ray(num_cpus: int) -> None:
    import ray

    # address="local": always a fresh local instance, never a cluster someone else on this machine started.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


class Watchdog:
    """Ends the process when a pipeline run hangs, after printing Ray Data's last progress report."""

    def __init__(self, seconds: float) -> None:
        import threading

        self.timer = threading.Timer(seconds, self._fire, args=(seconds,)) if seconds > 0 else None
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    @staticmethod
    def _fire(seconds: float) -> None:
        print(f"pipeline run not finished after {seconds:.0f} s; last Ray Data progress:", file=sys.stderr)
        try:
            import ray

            logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "ray-data" / "ray-data.log"
            lines = logs.read_text().splitlines()
            last = max(i for i, line in enumerate(lines) if "Execution Progress" in line)
            print("\n".join(line[:300] for line in lines[last : last + 12]), file=sys.stderr)
        except Exception as exc:  # noqa: BLE001
            print(f"(no Ray Data log: {exc})", file=sys.stderr)
        sys.stderr.flush()
        try:  # take the local Ray this process started down with it
            import ray

            ray._private.worker._global_node.kill_all_processes(check_alive=False, allow_graceful=True)
        except Exception:  # noqa: BLE001
            pass
        os._exit(3)


class PhaseClock:
    """Wraps the driver-side helpers run_dataset_job calls, to time its phases and sample memory after each."""

    NAMES = ("duplicate_ids", "finished_ids", "totals", "write_audiofolder_index")

    def __init__(self) -> None:
        self.events: list[dict] = []

    def mark(self, name: str) -> None:
        self.events.append({"phase": name, "t": time.perf_counter(), **memory_kb()})

    def install(self) -> None:
        import pipeline.dataset_job as dj

        for name in self.NAMES:
            original = getattr(dj, name, None)
            if original is None:
                continue

            def wrapped(*args, _original=original, _name=name, **kwargs):
                self.mark(f"{_name}:start")
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.mark(f"{_name}:end")

            setattr(dj, name, wrapped)

    def phases(self, started: float, ended: float) -> dict:
        times = {e["phase"]: e["t"] for e in self.events}
        out = {}
        for name in self.NAMES:
            if f"{name}:start" in times:
                out[f"{name}_s"] = round(times[f"{name}:end"] - times[f"{name}:start"], 3)
        if "finished_ids:end" in times and "totals:start" in times:
            # Graph construction, actor start-up, model load, and every row through every stage.
            out["stream_s"] = round(times["totals:start"] - times["finished_ids:end"], 3)
        out["total_s"] = round(ended - started, 3)
        return out

    def memory(self) -> dict:
        keep = ("duplicate_ids:end", "finished_ids:end", "totals:start", "write_audiofolder_index:end")
        return {
            e["phase"].replace(":", "_"): {k: v for k, v in e.items() if k.endswith("_kb")}
            for e in self.events
            if e["phase"] in keep
        }


class DatasetCapture:
    """Remembers the Dataset run_dataset_job iterates, for Ray Data's per-operator stats afterwards."""

    def __init__(self) -> None:
        self.dataset = None

    def install(self) -> None:
        import ray.data

        original = getattr(ray.data.Dataset.iter_batches, "_bench_original", ray.data.Dataset.iter_batches)
        capture = self

        def iter_batches(ds, *args, **kwargs):
            capture.dataset = ds
            return original(ds, *args, **kwargs)

        iter_batches._bench_original = original
        ray.data.Dataset.iter_batches = iter_batches

    def operator_stats(self) -> dict:
        if self.dataset is None:
            return {}
        try:
            summary = self.dataset._get_stats_summary()  # private API: guarded
        except Exception as exc:  # noqa: BLE001
            return {"error": f"stats unavailable: {exc}"}

        def total(stat):
            return None if stat is None else round(float(stat.sum), 3)

        ops = {}
        for op in _all_operators(summary):
            ops[op.operator_name] = {
                "time_total_s": round(op.time_total_s or 0.0, 3),
                "tasks": op.wall_time.count if op.wall_time else None,
                "task_wall_s": total(op.wall_time),
                "task_cpu_s": total(op.cpu_time),
                "udf_s": total(op.function_body_time),
                "output_rows": int(op.output_num_rows.sum) if op.output_num_rows else None,
                "output_mb": round(op.output_size_bytes.sum / 1e6, 2) if op.output_size_bytes else None,
            }
        it = summary.iter_stats
        ops["_driver_iteration"] = {
            "total_s": round(it.total_time.get(), 3),
            "time_to_first_batch_s": round(it.time_to_first_batch.get(), 3),
        }
        return ops


def _all_operators(summary):
    for parent in summary.parents:
        yield from _all_operators(parent)
    yield from summary.operators_stats


def read_path_uses_list_files(manifest: Path, cpu_stage_cpus: float) -> bool:
    """Whether the pipeline's own manifest reader plans Ray Data's ListFiles task (needs Ray initialised)."""
    from pipeline.reader import read_manifest

    ds = read_manifest(str(manifest), None, num_cpus=cpu_stage_cpus)
    seen, todo = set(), [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        seen.add(type(op).__name__)
        todo.extend(op.input_dependencies)
    return "ListFiles" in seen


def cpu_plan(args, uses_list_files: bool) -> dict:
    """Logical CPUs the actor pools reserve, and whether a ListFiles task (if planned) still fits."""
    reserved = args.actor_cpus + 3 * args.cpu_stage_cpus  # validate, fetch, write: one actor each
    return {
        "ray_num_cpus": args.num_cpus,
        "actor_pools_reserve": round(reserved, 3),
        "reader_plans_list_files_task": uses_list_files,
        "schedulable": (not uses_list_files) or reserved + LIST_FILES_CPUS <= args.num_cpus + 1e-9,
    }


def resolve_actor_cpus(args, uses_list_files: bool) -> str:
    """--actor-cpus auto: 1 CPU, or less when a ListFiles task would otherwise never get its CPU."""
    if args.actor_cpus is not None:
        return "given"
    args.actor_cpus = 1.0
    if uses_list_files and not cpu_plan(args, True)["schedulable"]:
        left = round(args.num_cpus - LIST_FILES_CPUS - 3 * args.cpu_stage_cpus, 6)
        args.actor_cpus = max(0.1, math.floor(left * 10) / 10)
        return "auto: reduced so that the reader's ListFiles task can be scheduled"
    return "auto"


def prepare_ray(args, manifest: Path) -> dict:
    """ray.init, then settle the actor's CPUs against the reader's plan; refuses a plan that would hang."""
    init_ray(args.num_cpus)
    uses_list_files = read_path_uses_list_files(manifest, args.cpu_stage_cpus)
    source = resolve_actor_cpus(args, uses_list_files)
    plan = cpu_plan(args, uses_list_files)
    plan["actor_cpus"] = args.actor_cpus
    plan["actor_cpus_source"] = source
    if not plan["schedulable"] and not args.allow_unschedulable:
        raise SystemExit(
            f"actor {args.actor_cpus} CPU + 3 CPU stages x {args.cpu_stage_cpus} leave less than the 1 CPU Ray "
            f"Data's ListFiles task needs of {args.num_cpus}: the job would hang. Lower --actor-cpus or "
            "--cpu-stage-cpus, raise --num-cpus, or pass --allow-unschedulable to watch it hang."
        )
    return plan


def job_for(args, manifest: Path, output: Path, checkpoint: str, rules=None):
    from model.checkpoint import CheckpointSpec
    from model.engine import EngineOptions
    from pipeline.dataset_job import DatasetJob, Resources
    from pipeline.manifest import ManifestRules

    return DatasetJob(
        manifest=str(manifest),
        output=str(output),
        checkpoint=CheckpointSpec(source=checkpoint, device="cpu"),
        engine=EngineOptions(max_batch_size=args.batch_size, ignore_eos=True),
        rules=rules or ManifestRules(),
        resources=Resources(
            actors=1,
            cpus_per_actor=args.actor_cpus,
            batch_size=args.batch_size,
            cpu_stage_cpus=args.cpu_stage_cpus,
        ),
    )


def run_job(args, job) -> tuple[dict, dict]:
    """run_dataset_job under the watchdog, with driver phases and Ray Data stats captured."""
    from pipeline.dataset_job import run_dataset_job

    clock, capture = PhaseClock(), DatasetCapture()
    clock.install()
    capture.install()
    watchdog = Watchdog(args.pipeline_timeout)
    started = time.perf_counter()
    try:
        summary = run_dataset_job(job)
    finally:
        watchdog.cancel()
    ended = time.perf_counter()
    return summary, {
        "wall_s": round(ended - started, 3),
        "driver_phases": clock.phases(started, ended),
        "driver_memory_kb": clock.memory(),
        "ray_data_operators": capture.operator_stats(),
    }


# ---------------------------------------------------------------- child: prepare


def write_manifest(path: Path, rows: int, max_new_tokens: int, voice: str | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def chunk(start: int, stop: int) -> pa.Table:
        ids = range(start, stop)
        columns = {
            "id": pa.array([f"row-{i:07d}" for i in ids], pa.string()),
            "text": pa.array([TEXTS[i % len(TEXTS)] for i in ids], pa.string()),
            "seed": pa.array(list(ids), pa.int64()),
            "max_new_tokens": pa.array([max_new_tokens] * (stop - start), pa.int64()),
        }
        if voice is not None:
            columns["voice"] = pa.array([voice] * (stop - start), pa.string())
        return pa.table(columns)

    with pq.ParquetWriter(str(path), chunk(0, 1).schema) as writer:
        for start in range(0, rows, 50_000):
            writer.write_table(chunk(start, min(rows, start + 50_000)))


def child_prepare(args, workdir: Path) -> None:
    from model.tiny import build_tiny_checkpoint

    build_tiny_checkpoint(workdir / "tiny")
    if not args.skip_throughput:
        write_manifest(workdir / "throughput.parquet", args.rows, args.max_new_tokens)
    if not args.skip_memory:
        (workdir / "empty-voice-library").mkdir(exist_ok=True)
        for size in memory_sizes(args):
            write_manifest(workdir / f"memory-{size}.parquet", size, args.max_new_tokens, voice="nobody")


# ---------------------------------------------------------------- child: throughput


def manifest_requests(path: Path):
    import pyarrow.parquet as pq

    from pipeline.manifest import ManifestRules, to_request, validate_row

    rules = ManifestRules()
    return [to_request(validate_row(row, rules)) for row in pq.read_table(str(path)).to_pylist()]


def bench_engine(engine, reqs, batch_size: int) -> dict:
    engine.generate(reqs[:batch_size])  # warm-up
    frames = 0
    started = time.perf_counter()
    for i in range(0, len(reqs), batch_size):  # one engine call per batch, as SynthesizeStage calls it
        frames += sum(r.generated_frames for r in engine.generate(reqs[i : i + batch_size]))
    wall = time.perf_counter() - started
    return {
        "rows": len(reqs),
        "frames": frames,
        "wall_s": round(wall, 3),
        "rows_per_s": round(len(reqs) / wall, 3),
        "x_real_time": round(frames / FRAME_RATE / wall, 2),
    }


def probe_actor_threads(actor_cpus: float) -> dict:
    """The torch/OMP threads a Ray actor with the synthesis actor's num_cpus gets."""
    import ray

    @ray.remote(num_cpus=actor_cpus)
    class Probe:
        def threads(self) -> dict:
            import torch

            return {
                "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            }

    probe = Probe.remote()
    try:
        return ray.get(probe.threads.remote())
    finally:
        ray.kill(probe)
        deadline = time.time() + 30  # let its CPUs come back before the pipeline starts
        while time.time() < deadline and ray.available_resources().get("CPU", 0) < cluster_cpus():
            time.sleep(0.2)


def cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 0)


def bench_pipeline(args, checkpoint: str, manifest: Path, workdir: Path, repeat: int) -> dict:
    output = workdir / f"pipeline-out-{repeat}"
    started_unix = time.time()
    summary, run = run_job(args, job_for(args, manifest, output, checkpoint))
    rows = summary["this_run"]["rows"]
    wall = run["wall_s"]
    out = {
        "rows": rows,
        "by_status": summary["this_run"]["by_status"],
        "audio_seconds": summary["this_run"]["audio_seconds"],
        "wall_s": wall,
        "rows_per_s": round(rows / wall, 3),
        **{k: v for k, v in run.items() if k != "wall_s"},
        **write_timeline(output, started_unix),
        "startup_timeline": startup_timeline(started_unix),
    }
    synth = out["ray_data_operators"].get("MapBatches(SynthesizeStage)") or {}
    if synth.get("udf_s"):
        # One actor runs its batches one after another, so the UDF total is its busy time.
        out["synthesis_stage_busy_s"] = synth["udf_s"]
        out["synthesis_stage_rows_per_s"] = round(rows / synth["udf_s"], 3)
        out["not_synthesising_s"] = round(wall - synth["udf_s"], 3)
    shutil.rmtree(output, ignore_errors=True)
    return out


def startup_timeline(started_unix: float) -> dict:
    """From Ray's task events: when each stage actor's __init__ started (after the run began) and its length."""
    import ray

    try:
        events = [e for e in ray.timeline() if e.get("ts", 0) / 1e6 >= started_unix - 1]
    except Exception as exc:  # noqa: BLE001
        return {"error": f"timeline unavailable: {exc}"}
    out = {}
    for e in events:
        match = re.search(r"MapWorker\((.*)\)\.__init__", str(e.get("cat", "")))
        if e.get("name") == "__init__" and match:
            start = e["ts"] / 1e6 - started_unix
            out[match.group(1)] = {"init_start_s": round(start, 2), "init_s": round(e.get("dur", 0) / 1e6, 2)}
    return out


def write_timeline(output: Path, started_unix: float) -> dict:
    """When metadata parts were written (their names carry time_ns): does writing overlap synthesis?"""
    import pyarrow.parquet as pq

    parts = []
    for path in (output / "metadata").glob("part-*.parquet"):
        pieces = path.stem.split("-")  # part-<run_id>-<time_ns>-<uuid>
        if len(pieces) == 4 and pieces[2].isdigit():
            parts.append((int(pieces[2]) / 1e9, pq.ParquetFile(path).metadata.num_rows))
    parts.sort()
    if not parts:
        return {"metadata_parts": 0}
    return {
        "metadata_parts": len(parts),
        "first_part_after_s": round(parts[0][0] - started_unix, 3),
        "last_part_after_s": round(parts[-1][0] - started_unix, 3),
    }


def stage_profile(args, checkpoint: str, manifest: Path, workdir: Path, rows: int) -> dict:
    """Milliseconds per row of each stage's __call__ on the same rows, serially in this process.

    SynthesizeStage and the bare engine run alternately on each batch, three times, best of three per batch
    (the machine is shared and noisy); the other stages are cheap and timed once.
    """
    import pyarrow.parquet as pq

    from model.checkpoint import CheckpointSpec
    from model.engine import EngineOptions
    from pipeline.manifest import ManifestRules, to_request
    from pipeline.references import FetchPolicy
    from pipeline.stages import (
        FetchStage,
        SynthesisSettings,
        SynthesizeStage,
        ValidateStage,
        WriteSettings,
        WriteStage,
        encode_audio,
        pack,
        unpack,
    )
    from pipeline.storage import Storage

    table = pq.read_table(str(manifest)).slice(0, rows)
    n, bs = table.num_rows, args.batch_size
    batches = [table.slice(i, bs) for i in range(0, n, bs)]  # the pipeline's blocks: one engine batch each

    def timed(fn, items):
        started = time.perf_counter()
        out = [fn(x) for x in items]
        return out, time.perf_counter() - started

    validated, validate_s = timed(ValidateStage(ManifestRules(), frozenset()), batches)
    fetched, fetch_s = timed(FetchStage(FetchPolicy(), EngineOptions().max_reference_seconds), validated)
    synth = SynthesizeStage(
        SynthesisSettings(
            CheckpointSpec(source=checkpoint, device="cpu"), EngineOptions(max_batch_size=bs, ignore_eos=True)
        )
    )
    synth(fetched[0])  # warm-up
    stage_best, engine_best, synthesized = [], [], []
    for block in fetched:
        reqs = [to_request(r, r.pop("_audio", None)) for r in unpack(block)]
        times_stage, times_engine = [], []
        for _ in range(3):
            started = time.perf_counter()
            out = synth(block)
            times_stage.append(time.perf_counter() - started)
            started = time.perf_counter()
            synth.engine.generate(reqs)
            times_engine.append(time.perf_counter() - started)
        synthesized.append(out)
        stage_best.append(min(times_stage))
        engine_best.append(min(times_engine))
    payloads = [len(b) for t in synthesized for b in t.column("payload").to_pylist()]
    unpacked, unpack_s = timed(unpack, synthesized)
    _, pack_s = timed(pack, unpacked)
    results = [r["_result"] for rs in unpacked for r in rs]
    encoded, encode_s = timed(lambda r: encode_audio(r.waveform, r.sample_rate, "wav"), results)
    storage = Storage(str(workdir / "profile-raw"))
    started = time.perf_counter()
    for i, data in enumerate(encoded):
        storage.write_bytes(f"audio/{i}.wav", data)
    store_s = time.perf_counter() - started
    write = WriteStage(WriteSettings(str(workdir / "profile-out"), checkpoint=checkpoint))
    _, write_s = timed(write, synthesized)

    def ms(seconds: float) -> float:
        return round(seconds / n * 1000, 3)

    return {
        "rows": n,
        "ms_per_row": {
            "validate_stage": ms(validate_s),
            "fetch_stage": ms(fetch_s),
            "synthesize_stage": ms(sum(stage_best)),
            "engine_generate_same_batches": ms(sum(engine_best)),
            "synthesize_stage_minus_engine": ms(sum(stage_best) - sum(engine_best)),
            "write_stage": ms(write_s),
            "write_stage.encode_wav": ms(encode_s),
            "write_stage.storage_write_bytes": ms(store_s),
            "unpack_synthesized_payload": ms(unpack_s),
            "pack_synthesized_payload": ms(pack_s),
        },
        "synthesized_payload_bytes_per_row": round(sum(payloads) / n),
        "waveform_bytes_per_row": round(sum(r.waveform.nbytes for r in results) / n),
    }


STARTUP_SNIPPETS = {
    # What each CPU-stage actor imports to unpickle its class, and what the synthesis actor adds.
    "import_pipeline_stages": "import pipeline.stages",
    "import_ray_data": "import ray.data",
    "import_model_engine": "import model.engine",
    "import_pipeline_dataset_job (driver)": "import pipeline.dataset_job",
    "load_checkpoint (synthesis actor __init__)": (
        "import model.engine, model.checkpoint as c; _t = __import__('time').perf_counter(); "
        "c.load_checkpoint(c.CheckpointSpec(source=CKPT, device='cpu'))"
    ),
}


def startup_costs(checkpoint: str) -> dict:
    """Seconds and peak RSS of each start-up step, each in a fresh interpreter, one at a time."""
    out = {}
    for name, snippet in STARTUP_SNIPPETS.items():
        code = (
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); CKPT = {checkpoint!r}; "
            f"_t = time.perf_counter(); {snippet}; "
            "print(time.perf_counter() - _t, [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        try:  # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's
            seconds, _, hwm, _ = proc.stdout.split()[-4:]
            out[name] = {"s": round(float(seconds), 2), "peak_rss_mb": int(hwm) // 1024}
        except ValueError:
            out[name] = {"error": proc.stderr[-300:]}
    return out


def child_throughput(args, workdir: Path) -> dict:
    import ray
    import torch

    from model.checkpoint import CheckpointSpec
    from model.engine import EngineOptions, SynthesisEngine

    checkpoint = str(workdir / "tiny")
    manifest = workdir / "throughput.parquet"
    plan = prepare_ray(args, manifest)
    threads = max(1, math.floor(args.actor_cpus))  # what Ray's OMP_NUM_THREADS rule gives the actor
    torch.set_num_threads(threads)
    out: dict = {"cpu_plan": plan, "engine_torch_threads": torch.get_num_threads()}
    engine_runs, pipeline_runs = [], []
    try:
        out["actor_threads_probe"] = probe_actor_threads(args.actor_cpus)
        started = time.perf_counter()
        engine = SynthesisEngine.from_spec(
            CheckpointSpec(source=checkpoint, device="cpu"),
            EngineOptions(max_batch_size=args.batch_size, ignore_eos=True),
        )
        out["engine_load_s"] = round(time.perf_counter() - started, 3)
        reqs = manifest_requests(manifest)
        for repeat in range(args.repeats):  # alternate, so both sides see the same background load
            engine_runs.append(bench_engine(engine, reqs, args.batch_size))
            pipeline_runs.append(bench_pipeline(args, checkpoint, manifest, workdir, repeat))
    finally:
        ray.shutdown()
    engine_rps = max(r["rows_per_s"] for r in engine_runs)
    best = max(pipeline_runs, key=lambda r: r["rows_per_s"])
    out.update(
        engine_rows_per_s=engine_rps,
        pipeline_rows_per_s=best["rows_per_s"],
        ratio=round(best["rows_per_s"] / engine_rps, 3),
        goal_ratio=0.8,
    )
    if best.get("synthesis_stage_rows_per_s"):
        # Wall = N/E + X, X the seconds the pipeline adds to the bare engine's time (start-up, model load,
        # draining, unoverlapped per-row work). Ratio = 1 / (1 + X E / N) >= 0.8 from N = 4 X E, if X stays fixed.
        fixed = best["wall_s"] - best["rows"] / engine_rps
        out.update(
            synthesis_stage_vs_engine=round(best["synthesis_stage_rows_per_s"] / engine_rps, 3),
            pipeline_extra_s=round(fixed, 3),
            rows_for_ratio_0_8=math.ceil(4 * max(fixed, 0) * engine_rps),
        )
    out["engine_runs"] = engine_runs
    out["pipeline_runs"] = pipeline_runs
    if args.profile_rows:
        out["stage_profile"] = stage_profile(args, checkpoint, manifest, workdir, args.profile_rows)
        out["startup_costs"] = startup_costs(checkpoint)
    return out


# ---------------------------------------------------------------- child: memory


def child_memory(args, workdir: Path, size: int) -> dict:
    marks = {"start": memory_kb()}
    import pipeline.dataset_job  # noqa: F401 - the imports the driver pays for
    from pipeline.manifest import ManifestRules

    marks["after_pipeline_imports"] = memory_kb()
    manifest = workdir / f"memory-{size}.parquet"
    plan = prepare_ray(args, manifest)
    marks["after_ray_init"] = memory_kb()
    rules = ManifestRules(voice_library=str(workdir / "empty-voice-library"))
    output = workdir / f"memory-out-{size}"
    summary, run = run_job(args, job_for(args, manifest, output, str(workdir / "tiny"), rules))
    marks["after_run"] = memory_kb()
    import ray

    ray.shutdown()
    shutil.rmtree(output, ignore_errors=True)
    rows = summary["this_run"]["rows"]
    stream = run["driver_phases"].get("stream_s")
    return {
        "rows": rows,
        "by_status": summary["this_run"]["by_status"],
        "cpu_plan": plan,
        "wall_s": run["wall_s"],
        "rows_per_s": round(rows / run["wall_s"], 1),
        "stream_rows_per_s": round(rows / stream, 1) if stream else None,
        "ru_maxrss_kb_before": marks["after_ray_init"]["ru_maxrss_kb"],
        "ru_maxrss_kb_after": marks["after_run"]["ru_maxrss_kb"],
        "ru_maxrss_growth_kb": marks["after_run"]["ru_maxrss_kb"] - marks["after_ray_init"]["ru_maxrss_kb"],
        "memory_kb": {**marks, **run["driver_memory_kb"]},
        "driver_phases": run["driver_phases"],
        "ray_data_operators": run["ray_data_operators"],
        "manifest_bytes": manifest.stat().st_size,
    }


# ---------------------------------------------------------------- the orchestrator (no torch, no Ray)


def memory_sizes(args) -> list[int]:
    return [int(s) for s in args.memory_rows.split(",") if s]


def run_child(kind: str, workdir: Path, extra: list[str], timeout: float) -> dict | None:
    result = workdir / f"result-{kind}-{'-'.join(extra) or 'all'}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    cmd += ["--child", kind, "--workdir", str(workdir), "--child-result", str(result), *extra]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    print(
        f"[bench_pipeline] {kind} {' '.join(extra)}: {time.perf_counter() - started:.1f} s", file=sys.stderr
    )
    return json.loads(result.read_text()) if result.exists() else None


def git_state() -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    changed = git("status", "--porcelain", "--", "model", "pipeline").splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "uncommitted_model_pipeline": changed}


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000, help="manifest rows for the throughput part")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="decode steps per row (EOS ignored)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per engine call, in both runs")
    parser.add_argument(
        "--actor-cpus",
        type=float,
        default=None,
        help="Resources.cpus_per_actor; default 1, lowered only if the reader's ListFiles task would not fit",
    )
    parser.add_argument("--cpu-stage-cpus", type=float, default=0.2, help="Resources.cpu_stage_cpus")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    parser.add_argument("--repeats", type=int, default=1, help="engine/pipeline runs, alternating; best kept")
    parser.add_argument("--profile-rows", type=int, default=64, help="rows for the stage profile (0: off)")
    parser.add_argument("--memory-rows", default="10000,100000", help="manifest sizes for the memory part")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--pipeline-timeout", type=float, default=900, help="seconds before a hung run is ended"
    )
    parser.add_argument(
        "--allow-unschedulable",
        action="store_true",
        help="run even when the reader's ListFiles task cannot be scheduled (the watchdog ends the hang)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", choices=["prepare", "throughput", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--child-result", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        workdir = Path(args.workdir)
        if args.child == "prepare":
            child_prepare(args, workdir)
            return
        result = child_throughput(args, workdir) if args.child == "throughput" else None
        if args.child == "memory":
            result = child_memory(args, workdir, args.size)
        Path(args.child_result).write_text(json.dumps(result))
        return

    begun = time.perf_counter()
    report: dict = {
        "benchmark": "pipeline",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "gpu": None,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": version("torch"),
            "ray": version("ray"),
            "transformers": version("transformers"),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "command": " ".join(["python", "scripts/bench_pipeline.py", *sys.argv[1:]]),
        "settings": {
            "rows": args.rows,
            "max_new_tokens": args.max_new_tokens,
            "ignore_eos": True,
            "batch_size": args.batch_size,
            "actor_cpus": args.actor_cpus if args.actor_cpus is not None else "auto",
            "cpu_stage_cpus": args.cpu_stage_cpus,
            "ray_num_cpus": args.num_cpus,
            "repeats": args.repeats,
        },
        "git": git_state(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    limit = args.pipeline_timeout * max(1, args.repeats) + 900
    try:
        run_child("prepare", workdir, [], limit)
        if not args.skip_throughput:
            report["throughput"] = run_child("throughput", workdir, [], limit)
        if not args.skip_memory:
            runs = [run_child("memory", workdir, ["--size", str(n)], limit) for n in memory_sizes(args)]
            small, large = runs[0], runs[-1]
            report["driver_memory"] = {
                "rows": [r["rows"] for r in runs],
                "ru_maxrss_kb_after": [r["ru_maxrss_kb_after"] for r in runs],
                "ru_maxrss_ratio_largest_vs_smallest": round(
                    large["ru_maxrss_kb_after"] / small["ru_maxrss_kb_after"], 3
                ),
                "ru_maxrss_growth_kb": [r["ru_maxrss_growth_kb"] for r in runs],
                "stream_rows_per_s": [r["stream_rows_per_s"] for r in runs],
                "runs": runs,
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["bench_wall_s"] = round(time.perf_counter() - begun, 1)
    emit(report, args.out)


if __name__ == "__main__":
    main()
