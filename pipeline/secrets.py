"""Secrets in configs and error texts: which option names hold them, masking them, scrubbing them out."""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
# Whole name segments only: "aws_secret_access_key", "sas_token" and "token" are secret, "audio_tokenizer"
# and "max_new_tokens" are not.
SECRET_NAME = re.compile(
    r"(^|[_-])(key|secret|token|password|passwd|credentials?|sas|signature)([_-]?id)?$", re.IGNORECASE
)
# s3fs may take credentials from the environment rather than from options; their values are secrets too.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """Copy of ``options`` with every secret-looking value, at any depth, replaced by ``"***"``."""
    if not options:
        return {}
    return {key: _redact_value(key, value) for key, value in options.items()}


def _redact_value(name: object, value: Any) -> Any:
    if isinstance(name, str) and SECRET_NAME.search(name):
        return REDACTED
    if isinstance(value, dict):
        return {key: _redact_value(key, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(None, item) for item in value)
    return value


def secret_values(options: dict[str, Any] | None) -> set[str]:
    """Every secret string in ``options`` (at any depth) and in the credential environment variables."""
    found: set[str] = set()

    def walk(name: object, value: Any) -> None:
        if isinstance(name, str) and SECRET_NAME.search(name) and isinstance(value, str) and value:
            found.add(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(key, item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(name, item)

    walk(None, options or {})
    found.update(os.environ[name] for name in SECRET_ENV if os.environ.get(name))
    return found


def scrub(text: str, secrets: set[str]) -> str:
    """``text`` with each secret replaced by ``"***"``, longest first so overlapping secrets vanish whole."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
