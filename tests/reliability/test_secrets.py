"""Secrets never leave the process that needs them: not into logs, config.yaml, metadata or error messages.

The job runs as a user runs it (`python -m jobs.generate_dataset storage=s3`, credentials in the
environment) against the moto S3 server, with a Ray of its own whose temp folder is searched afterwards.
Storage failure messages are checked by tests/reliability/test_faults.py's outage tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import fsspec
import pytest

from tests.conftest import REGION
from tests.helpers import assert_output_contract, cli_env, generate_command, text_row

ACCESS_KEY_ID = "HBKEYID7Q2WE9R4T"
SECRET_KEY = "hb-aws-secret-9a8b7c6d5e4f"
SESSION_TOKEN = "hb-aws-session-token-1f2e3d4c"
URL_TOKEN = "hb-url-password-77aa31"  # a password written into a manifest's reference URL
SECRETS = (ACCESS_KEY_ID, SECRET_KEY, SESSION_TOKEN, URL_TOKEN)


def secrets_in(data: bytes | str) -> list[str]:
    data = data if isinstance(data, bytes) else data.encode("utf-8", "replace")
    return [secret for secret in SECRETS if secret.encode() in data]


def files_holding_secrets(folder: Path) -> dict[str, list[str]]:
    """Which files under `folder` hold which secrets (as bytes, so binary files count too)."""
    found: dict[str, list[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:  # sockets, files Ray removed meanwhile
                continue
            if hits := secrets_in(data):
                found[str(path)] = hits
    return found


@pytest.fixture
def ray_temp_dir():
    # Short (Ray's socket paths must fit in 107 bytes) and of its own, so only this run's logs are searched.
    folder = Path(tempfile.mkdtemp(prefix="hbs-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_cli_run_on_s3_shows_no_secret_in_logs_config_metadata_or_errors(
    workdir: Path, s3_server, s3_bucket: str, ray_temp_dir: Path
) -> None:
    fs = fsspec.filesystem("s3", **s3_server.storage_options)
    password_url = f"http://user:{URL_TOKEN}@127.0.0.1:9/voice.wav"
    rows = [
        text_row(0),
        text_row(1),
        text_row(2, id="missing-s3-clip", references=[{"audio": f"s3://{s3_bucket}/voices/none.wav"}]),
        text_row(3, id="clip-in-no-bucket", references=[{"audio": "s3://hb-no-such-bucket-x/voice.wav"}]),
        text_row(4, id="password-in-url", references=[{"audio": password_url}]),
    ]
    manifest = f"{s3_bucket}/inputs/manifest.jsonl"
    fs.pipe_file(manifest, "".join(json.dumps(row) + "\n" for row in rows).encode())
    root = f"{s3_bucket}/run"
    env = {
        **cli_env(),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
        "AWS_DEFAULT_REGION": REGION,
        "S3_ENDPOINT_URL": s3_server.endpoint_url,
        "RAY_TMPDIR": str(ray_temp_dir),
    }
    command = generate_command(
        "storage=s3", f"manifest=s3://{manifest}", f"output=s3://{root}", "runtime.batch_size=2"
    )

    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    streams = [("stdout", proc.stdout), ("stderr", proc.stderr)]

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fs.invalidate_cache()
    metadata = assert_output_contract(
        fs, root, [row["id"] for row in rows], container=s3_bucket, before={manifest}
    )
    assert {row_id for row_id, row in metadata.items() if row["status"] == "ok"} == {"row-0", "row-1"}
    assert metadata["missing-s3-clip"]["error"].endswith("not found")
    assert metadata["clip-in-no-bucket"]["error_field"] == "references[0].audio"
    assert metadata["password-in-url"]["error"].endswith("credentials in the URL are not supported")
    config = fs.cat_file(f"{root}/config.yaml").decode()
    for name in ("key", "secret", "token"):
        assert f"  {name}: '***'\n" in config

    # The job's own output, its stdout and stderr, Hydra's run folder, and every file of its Ray session.
    leaks = {path: hits for path in fs.find(root) if (hits := secrets_in(fs.cat_file(path)))}
    leaks.update({f"<{name}>": hits for name, text in streams if (hits := secrets_in(text))})
    leaks.update(files_holding_secrets(workdir / "outputs"))
    assert any((ray_temp_dir / "ray").rglob("*.log")), "the run's Ray logs are not where they were expected"
    leaks.update(files_holding_secrets(ray_temp_dir))
    assert not leaks, leaks
