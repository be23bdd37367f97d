"""Named crash points for fault tests: `CANCELFLOW_CRASH_POINTS=notification.after_smtp_send,...`.

A named point kills its process on the spot (like `kill -9`: no cleanup, no flush) the first time
it is reached; a marker file under the data dir keeps it from firing again after the supervisor's
restart, so the test sees one crash and the recovery. Production never sets the variable: unset,
`crash_point` is a dictionary lookup.

Points: `<service>.after_commit` (state committed, outbox not yet published),
`provisioning.after_vendor_call`, `payment_gateway.after_refund_call`, `notification.after_smtp_send`.
"""

from __future__ import annotations

import os
import sys
from functools import cache
from pathlib import Path


@cache
def _armed() -> frozenset[str]:
    return frozenset(p.strip() for p in os.environ.get("CANCELFLOW_CRASH_POINTS", "").split(",") if p.strip())


def _marker(name: str) -> Path:
    return Path(os.environ.get("CANCELFLOW_DATA_DIR", "./var")) / "crashpoints" / f"{name}.fired"


def crash_point(name: str) -> None:
    if name not in _armed():
        return
    marker = _marker(name)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    sys.stderr.write(f"crash point {name} reached: exiting like kill -9\n")
    sys.stderr.flush()
    os._exit(137)
