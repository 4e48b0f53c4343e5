"""`python -m jobs.generate_dataset` as a user runs it: the Hydra CLI, sweeps, a killed driver, Ray Jobs.

Each run is a subprocess with its own local Ray (runtime.address=local, so a cluster someone started on
this machine is never joined), working in a folder under tmp_path: Hydra's own files land there, and the
default model=tiny finds its checkpoint there as a link to the session's tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import pytest

from tests.helpers import (
    REPO,
    assert_output_contract,
    by_id,
    cli_env,
    cmdline,
    generate_command,
    group_members,
    kill_all,
    objects,
    process_tree,
    read_metadata,
    wait_gone,
    write_jsonl,
)

RAY = Path(sys.executable).parent / "ray"
LOCAL = fsspec.filesystem("file")


# ---- helpers ----------------------------------------------------------------------------------------


def generate(workdir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        generate_command(*overrides),
        cwd=workdir,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_manifest(path: Path, rows: list[dict]) -> Path:
    return write_jsonl(path, rows)


def text_rows(n: int, **extra) -> list[dict]:
    return [{"id": f"row-{i:02d}", "text": f"Row {i} is read aloud.", **extra} for i in range(n)]


def metadata_parts(out: Path) -> list[Path]:
    folder = out / "metadata"
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def assert_complete_output(
    out: Path, ids: list[str], container: Path | None = None, before: set[str] = frozenset()
) -> dict[str, dict]:
    """The shared output contract on local disk: `before` is what `container` (a folder around `out`) held
    before the run. Hydra's own run folder (outputs/ under the working folder) is not the job's output."""
    container = container or out
    return assert_output_contract(
        LOCAL, str(out), ids, container=str(container), before=before, ignore=(str(container / "outputs"),)
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- a killed driver --------------------------------------------------------------------------------


def test_a_run_killed_half_way_resumes_and_writes_every_id_exactly_once(workdir: Path) -> None:
    # Two rows per batch: each batch is one metadata part, written as soon as it is synthesised.
    ids = [f"row-{i:02d}" for i in range(12)]
    manifest = write_manifest(workdir / "manifest.jsonl", text_rows(12, max_new_tokens=60))
    out = workdir / "out"
    command = generate_command(
        f"manifest={manifest}", f"output={out}", "runtime.batch_size=2", "runtime.rows_per_call=2"
    )
    log = (workdir / "killed.log").open("w")
    before = objects(LOCAL, str(workdir))
    # A session of its own, so the driver and the Ray it started (GCS, raylet) die together.
    driver = subprocess.Popen(
        command, cwd=workdir, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while not metadata_parts(out):
            assert driver.poll() is None, "the run ended before it wrote any metadata part"
            assert time.monotonic() < deadline, "no metadata part within 240 s"
            time.sleep(0.05)
        ray_processes = process_tree({driver.pid})
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        log.close()
    assert driver.returncode == -signal.SIGKILL
    # Ray's workers sit in process groups of their own, but exit once their raylet is gone; a process that
    # only sees the GCS gone waits for it to come back for RAY_gcs_rpc_server_reconnect_timeout_s (60 s).
    left = wait_gone(ray_processes, timeout=90)
    survivors = {pid: cmdline(pid)[:200] for pid in sorted(left)}
    kill_all(left)
    assert not left, f"processes of the killed run still alive: {survivors}"

    killed = by_id(read_metadata(LOCAL, str(out)))
    assert 0 < len(killed) < len(ids), "the kill did not land half-way"
    assert all(row["status"] == "ok" for row in killed.values())

    rerun = subprocess.run(command, cwd=workdir, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_as_finished"] == len(killed)
    assert summary["this_run"]["by_status"] == {"ok": len(ids) - len(killed)}
    assert summary["output_totals"]["by_status"] == {"ok": len(ids)}
    assert len(metadata_parts(out)) >= 2
    assert_complete_output(out, ids, container=workdir, before=before)


# ---- sweeps -----------------------------------------------------------------------------------------


def test_a_multirun_over_two_seeds_writes_one_complete_output_per_seed(workdir: Path) -> None:
    ids = [f"row-{i:02d}" for i in range(4)]
    # No seed in the rows: generation.seed is the default each row takes.
    manifest = write_manifest(workdir / "manifest.jsonl", text_rows(4, max_new_tokens=40))
    sweep = workdir / "sweep"

    proc = generate(workdir, "--multirun", "generation.seed=1,2", f"output={sweep}", f"manifest={manifest}")

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outputs = {seed: sweep / f"generation.seed={seed}" for seed in (1, 2)}
    assert sorted(p.name for p in sweep.iterdir()) == sorted(p.name for p in outputs.values())
    audio = {}
    for seed, out in outputs.items():
        metadata = assert_complete_output(out, ids)
        assert {row["seed"] for row in metadata.values()} == {seed}
        summary = json.loads((out / "summary.json").read_text())
        assert summary["output"] == f"file://{out}"
        assert summary["this_run"]["by_status"] == {"ok": len(ids)}
        assert f"seed: {seed}\n" in (out / "config.yaml").read_text()
        audio[seed] = {row_id: (out / row["file_name"]).read_bytes() for row_id, row in metadata.items()}
    # The tiny checkpoint's random codec all but ignores its codes (its waveforms differ by ~1e-9, below
    # 16-bit PCM), so a row's audio changes with the seed where the seed changes its length.
    assert [i for i in ids if audio[1][i] != audio[2][i]]


# ---- Ray Jobs ---------------------------------------------------------------------------------------


def test_a_job_submitted_to_a_running_cluster_succeeds_and_writes_its_output(
    tmp_path: Path, tiny_checkpoint: str
) -> None:
    ids = [f"row-{i:02d}" for i in range(4)]
    manifest = write_manifest(tmp_path / "manifest.jsonl", text_rows(4, seed=7, max_new_tokens=30))
    out = tmp_path / "out"
    before = objects(LOCAL, str(tmp_path))
    dashboard = free_port()
    # A temp dir of its own (short: Ray's socket paths must fit in 107 bytes) keeps this head out of
    # /tmp/ray/ray_current_cluster, so no other local ray.init() on this machine joins it.
    temp_dir = tempfile.mkdtemp(prefix="hb-ray-", dir="/tmp")
    head = [
        str(RAY),
        "start",
        "--head",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    # `ray stop` would stop every Ray on this machine; the head's processes are found by their process
    # group (the session `ray start` ran in) and their descendants instead, and only those are stopped.
    start = subprocess.Popen(
        head,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        started_log, _ = start.communicate(timeout=180)
        assert start.returncode == 0, started_log[-3000:]
        submit = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.submit",
                "--address",
                f"http://127.0.0.1:{dashboard}",
                "--timeout-s",
                "240",
                "--",
                f"manifest={manifest}",
                f"output={out}",
                f"model.source={tiny_checkpoint}",
                "runtime.batch_size=2",
            ],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
        kill_all(process_tree(group_members(start.pid)))
        shutil.rmtree(temp_dir, ignore_errors=True)

    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-3000:]
    assert "SUCCEEDED" in submit.stdout
    metadata = assert_complete_output(out, ids, container=tmp_path, before=before)
    assert {row["status"] for row in metadata.values()} == {"ok"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["by_status"] == {"ok": len(ids)}
    assert summary["checkpoint"] == str(Path(tiny_checkpoint).resolve())


# ---- bad configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("manifest={tmp}/missing.jsonl", "manifest="),
        ("runtime.actors=0", "runtime.actors"),
        ("runtime.rows_per_call=0", "runtime.rows_per_call"),
        ("runtime.io_threads=0", "runtime.io_threads"),
    ],
    ids=["missing-manifest", "zero-actors", "zero-rows-per-call", "zero-fetch-threads"],
)
def test_a_bad_configuration_exits_2_naming_the_key_before_any_model_loads(
    tmp_path: Path, override: str, named: str
) -> None:
    manifest = write_manifest(tmp_path / "manifest.jsonl", text_rows(2, max_new_tokens=20))
    never_built = tmp_path / "never-built"  # model=tiny builds its checkpoint here on first use
    out = tmp_path / "out"
    overrides = [f"manifest={manifest}", override.format(tmp=tmp_path), f"output={out}"]
    started = time.monotonic()
    proc = generate(tmp_path, *overrides, f"model.source={never_built}", timeout=60)
    elapsed = time.monotonic() - started

    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "configuration error" in proc.stderr
    assert named in proc.stderr
    assert not never_built.exists()
    assert not out.exists()
    assert "Started a local Ray instance" not in proc.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_a_manifest_that_cannot_be_parsed_exits_2_naming_it_before_ray_starts(tmp_path: Path) -> None:
    # A JSON array written with indent=2 is not JSON Lines: most of its lines hold no object.
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps([{"id": "a", "text": "Fine."}, {"id": "b", "text": "Too."}], indent=2))
    out = tmp_path / "out"
    proc = generate(
        tmp_path, f"manifest={manifest}", f"output={out}", f"model.source={tmp_path}/x", timeout=60
    )

    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"manifest='{manifest}': manifest '{manifest}' cannot be read as JSON Lines: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr
    assert not out.exists()


def test_an_output_that_cannot_be_written_exits_2_naming_it_before_ray_starts(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "manifest.jsonl", text_rows(2, max_new_tokens=20))
    proc = generate(
        tmp_path, f"manifest={manifest}", f"output={manifest}", f"model.source={tmp_path}/x", timeout=60
    )

    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"configuration error: output='{manifest}' cannot be written" in proc.stderr
    assert "Not a directory" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr


def test_submitting_with_no_cluster_at_the_address_exits_2_saying_how_to_start_one(capsys) -> None:
    from jobs.submit import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there once closed

    assert main(["--address", address, "--", "output=/tmp/never"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach a Ray cluster at {address}" in err
    assert "ray start --head" in err


def test_a_run_into_an_output_another_run_is_writing_exits_2_before_ray_starts(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "manifest.jsonl", text_rows(2, max_new_tokens=20))
    out = tmp_path / "out"
    out.mkdir()
    lease = {"lease_id": "first-run", "host": "another-host", "pid": 4242, "renewed_at": time.time()}
    (out / "_lease.json").write_text(json.dumps(lease))

    proc = generate(
        tmp_path, f"manifest={manifest}", f"output={out}", f"model.source={tmp_path}/x", timeout=60
    )

    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "run first-run (pid 4242 on another-host" in proc.stderr and "is writing into" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["_lease.json"]
