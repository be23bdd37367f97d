"""The operator `cancelflow up` makes when CANCELFLOW_OPERATORS is unset (CONTRACT.md section 11), and
how the CLI and the test clients find a token for the status API.

The token is kept in the data dir (`operator-token`, readable by its owner only), so a second `up`
on the same data dir keeps the same one; it is never written to stack.json nor to a log."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cancelflow.settings import CommonSettings

TOKEN_FILE = "operator-token"
EMBEDDED_OPERATOR = "admin"


def embedded_operator(data_dir: Path) -> tuple[str, str]:
    """(CANCELFLOW_OPERATORS value, token) of the embedded stack's one operator, made once per data dir."""
    path = data_dir / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = ""
    if not token:
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
    return f"{EMBEDDED_OPERATOR}:operator:{token}", token


def token_for(settings: CommonSettings) -> str | None:
    """CANCELFLOW_TOKEN, else the embedded operator's token of the settings' data dir (if any)."""
    if token := os.environ.get("CANCELFLOW_TOKEN"):
        return token.strip()
    try:
        return (settings.data_dir.resolve() / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None
