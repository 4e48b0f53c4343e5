"""Shared fixtures: offline model hubs, a local moto S3 server, the tiny checkpoint and a local Ray."""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# Set before anything imports transformers/huggingface_hub, which read these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

FAKE_KEY = "testing"
FAKE_SECRET = "testing"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_bindable(port: int, timeout_s: float = 10.0) -> None:
    # ThreadedMotoServer.start() waits forever on an event its thread never sets if the bind fails, so
    # make sure the previous listener has really let go of the port before starting again.
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.05)


class MotoS3:
    """A moto S3 server on 127.0.0.1 that tests may stop and start again on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"
        self._server: Any = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this server; a fresh dict each time, since botocore edits config dicts."""
        return copy.deepcopy(
            {
                "endpoint_url": self.endpoint_url,
                "key": FAKE_KEY,
                "secret": FAKE_SECRET,
                # One HTTP attempt per call: botocore's own legacy retries would otherwise spend up to
                # ~10 s per call against a stopped server, and Storage's retries are what is under test.
                "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2},
            }
        )

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if self.running:
            return
        _wait_until_bindable(self.port)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=FAKE_KEY,
            aws_secret_access_key=FAKE_SECRET,
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    # werkzeug logs every request at INFO; that drowns real failures in the captured output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        # Keep a developer's real AWS setup (profiles, endpoint overrides, tokens) out of the tests.
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3",
        ):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)

        server = MotoS3(_free_port())
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoS3) -> Iterator[str]:
    import s3fs

    # A test that stopped the server and failed before restarting it must not break the next one.
    s3_server.start()
    # Through boto3: s3fs mkdir sends a LocationConstraint for us-east-1, which moto rejects.
    name = f"hb-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield name
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


# ---------------------------------------------------------------- the tiny checkpoint and its engine


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from model.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-higgs")))


@pytest.fixture(scope="session")
def engine(tiny_checkpoint: str):
    from model.checkpoint import CheckpointSpec
    from model.engine import EngineOptions, SynthesisEngine

    return SynthesisEngine.from_spec(CheckpointSpec(source=tiny_checkpoint, device="cpu"), EngineOptions())


@pytest.fixture(scope="session")
def engine64(tiny_checkpoint: str):
    """The tiny engine in float64. Batching rows differently changes float32 results in the last bits (the
    CPU's matrix kernels block by the number of rows), which flips a sampled code where two are near-tied
    (with the tiny model's random weights, one code of 24 rows refilled at batch 16). In float64 such ties vanish, so a test that
    two decode paths give identical codes checks their logic, not their rounding."""
    from model.checkpoint import CheckpointSpec
    from model.engine import EngineOptions, SynthesisEngine

    spec = CheckpointSpec(source=tiny_checkpoint, device="cpu", dtype="float64")
    return SynthesisEngine.from_spec(spec, EngineOptions())


# ---------------------------------------------------------------- a local Ray for the session


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # One instance for every module that runs jobs in-process: starting one costs ~8 s here.
    # address="local": a fresh instance even if a `ray start` cluster runs on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- an HTTP server for reference URLs


@pytest.fixture
def http_server():
    from tests.helpers import serve_audio

    with serve_audio() as server:
        yield server


# ---------------------------------------------------------------- a working folder for CLI runs


@pytest.fixture
def workdir(tmp_path, tiny_checkpoint: str):
    """A folder to run the jobs' CLI in: Hydra's files land there, and the default model=tiny finds its
    checkpoint there as a link to the session's tiny checkpoint."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "tiny-higgs-v2").symlink_to(tiny_checkpoint)
    return tmp_path
