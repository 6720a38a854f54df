"""Secrets read from files, never from configuration text or command lines.

A relative file name is a systemd credential id: under a unit with `LoadCredential=`, it is found in
`$CREDENTIALS_DIRECTORY`. The agent (MQTT password, TLS key, API token) and edgectl (`--password-file`)
read their secrets the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgefleet.errors import ConfigError

__all__ = ["credential_path", "read_secret"]


def credential_path(path: Path) -> Path:
    """Resolve a secret file name: relative names come from systemd's $CREDENTIALS_DIRECTORY when set."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds:
        return Path(creds) / path
    return path


def read_secret(path: Path) -> str:
    """The content of a secret file without its trailing newline; ConfigError when unreadable."""
    p = credential_path(path)
    try:
        return p.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as err:
        raise ConfigError(f"cannot read secret file {p}: {err.strerror}") from err
