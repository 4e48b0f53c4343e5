"""One run at a time per output: a lease object under the output that a run renews while it runs.

Two runs writing into one output (a job submitted twice, a rerun started while the first still runs) would
both synthesise the pending rows and write each id into the metadata twice, and the first to finish would
clear the other's in-flight objects from ``_tmp/``. A run therefore claims ``<output>/_lease.json`` before
it starts, renews it every ``RENEW_S`` from a thread, and removes it when it ends. A lease is left behind
only by a run that was killed; it stops counting once its driver's process is gone (same host) or it has
not been renewed for ``STALE_S`` (another host). Object stores have no create-if-absent, so two runs
started within the same second could both claim it: this guards against mistakes, not against races.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.storage import Storage

LEASE_KEY = "_lease.json"
RENEW_S = 30.0
STALE_S = 300.0

log = logging.getLogger(__name__)


class OutputInUseError(RuntimeError):
    """Another run holds the output's lease."""


def holder(storage: Storage, stale_s: float = STALE_S) -> str | None:
    """Who else is writing into the output, in words, or None when no live run holds its lease."""
    try:
        lease = json.loads(storage.read_text(LEASE_KEY))
    except FileNotFoundError:
        return None
    except ValueError:  # a lease cut short while written: nobody can be renewing it
        return None
    age = time.time() - float(lease.get("renewed_at", 0))
    # On this host the driver's process tells: gone (killed), or this very process (an earlier run whose
    # lease could not be removed, in an outage) does not hold it.
    pid = int(lease.get("pid", 0))
    if lease.get("host") == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return None
    if age > stale_s:
        return None
    return (
        f"run {lease.get('lease_id')} (pid {lease.get('pid')} on {lease.get('host')}, lease renewed "
        f"{age:.0f} s ago) is writing into {storage.uri_of_root()}; wait for it or stop it (a killed run's "
        f"lease lapses once its process is gone, or {stale_s:.0f} s after its last renewal; deleting "
        f"{storage.uri(LEASE_KEY)} also releases it)"
    )


@contextmanager
def output_lease(storage: Storage, renew_s: float = RENEW_S, stale_s: float = STALE_S) -> Iterator[None]:
    """Hold the output's lease for the duration of the block; raise OutputInUseError if a live run has it."""
    other = holder(storage, stale_s)
    if other is not None:
        raise OutputInUseError(other)
    lease = {"lease_id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}

    def write() -> None:
        storage.write_text(LEASE_KEY, json.dumps({**lease, "renewed_at": time.time()}))

    write()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(renew_s):
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - a missed renewal only shortens the lease
                log.warning("could not renew the output lease: %s", exc)

    thread = threading.Thread(target=renew, name="output-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        try:
            storage.delete(LEASE_KEY)
        except Exception as exc:  # noqa: BLE001 - the run's own outcome matters more; the lease lapses
            log.warning("could not remove the output lease: %s", exc)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
