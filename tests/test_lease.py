"""One run at a time per output: the lease a run holds, renews and removes (pipeline.lease)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lease import LEASE_KEY, OutputInUseError, output_lease
from pipeline.storage import Storage


def plant(storage: Storage, *, host: str, pid: int, age_s: float = 0.0) -> None:
    """A lease as another run would have left it."""
    lease = {"lease_id": "other-run", "host": host, "pid": pid, "renewed_at": time.time() - age_s}
    storage.write_text(LEASE_KEY, json.dumps(lease))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_run_holds_the_lease_while_it_runs_and_removes_it_after(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    with output_lease(storage):
        lease = json.loads(storage.read_text(LEASE_KEY))
        assert (lease["host"], lease["pid"]) == (socket.gethostname(), os.getpid())
    assert not storage.exists(LEASE_KEY)


def test_the_lease_is_renewed_while_the_run_goes_on(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    with output_lease(storage, renew_s=0.05):
        first = json.loads(storage.read_text(LEASE_KEY))["renewed_at"]
        time.sleep(0.3)
        assert json.loads(storage.read_text(LEASE_KEY))["renewed_at"] > first


def test_a_second_run_is_refused_while_another_holds_a_fresh_lease(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    plant(storage, host="another-host", pid=4242, age_s=10)

    refusal = r"run other-run \(pid 4242 on another-host"
    with pytest.raises(OutputInUseError, match=refusal) as refused, output_lease(storage):
        pass
    assert f"deleting {storage.uri(LEASE_KEY)} also releases it" in str(refused.value)
    assert json.loads(storage.read_text(LEASE_KEY))["lease_id"] == "other-run"  # left alone


def test_a_lease_not_renewed_for_the_stale_time_is_taken_over(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    plant(storage, host="another-host", pid=4242, age_s=301)
    with output_lease(storage, stale_s=300):
        assert json.loads(storage.read_text(LEASE_KEY))["pid"] == os.getpid()


def test_a_lease_whose_driver_on_this_host_is_gone_is_taken_over_at_once(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "out"))
    plant(storage, host=socket.gethostname(), pid=dead_pid())
    with output_lease(storage):
        assert json.loads(storage.read_text(LEASE_KEY))["pid"] == os.getpid()
