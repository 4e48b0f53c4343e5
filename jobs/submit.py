"""Submit a job to a running Ray cluster through the Ray Jobs API, with this folder as working dir.

    python -m jobs.submit --address http://127.0.0.1:8265 -- manifest=s3://b/m.parquet output=s3://b/run1
    python -m jobs.submit --job render_audiobook --no-wait -- books=...

The same as:
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python -m jobs.generate_dataset manifest=... output=...

Token authentication (on by default for `ray start --head` since Ray 2.60) is used when ~/.ray/auth_token or
RAY_AUTH_TOKEN exists; credentials for object storage travel as environment variables, never in the command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

JOBS = ("generate_dataset", "render_audiobook", "regenerate_eval")
# Never uploaded: the virtualenv, outputs, caches. The tiny checkpoint is rebuilt on the cluster if missing.
EXCLUDES = [".venv/", "outputs/", "multirun/", "checkpoints/", ".git/", "**/__pycache__/", ".ruff_cache/"]
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "S3_ENDPOINT_URL",
)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"))
    parser.add_argument("--job", choices=JOBS, default="generate_dataset")
    parser.add_argument("--working-dir", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--no-wait", action="store_true", help="return after submitting")
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the job, after --")
    return parser.parse_args(argv)


def use_token_auth() -> None:
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"


def submit(args: argparse.Namespace) -> tuple[object, str]:
    use_token_auth()
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    entrypoint = " ".join(
        [sys.executable if _same_machine(args.address) else "python", "-m", f"jobs.{args.job}"]
    )
    entrypoint += "".join(" " + shlex.quote(o) for o in args.overrides)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": args.working_dir, "excludes": EXCLUDES, "env_vars": env},
    )
    return client, job_id


def _same_machine(address: str) -> bool:
    # A head on this machine runs the job with this interpreter, so its packages are the ones installed here.
    return any(host in address for host in ("127.0.0.1", "localhost"))


def wait(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        client, job_id = submit(args)
    except ConnectionError as exc:
        print(
            f"cannot reach a Ray cluster at {args.address} ({exc}); start one with `ray start --head` or "
            "pass --address (or RAY_ADDRESS) with its dashboard URL",
            file=sys.stderr,
        )
        return 2
    print(f"submitted {job_id} to {args.address}")
    if args.no_wait:
        return 0
    status = wait(client, job_id, args.timeout_s)
    print(client.get_job_logs(job_id))
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
