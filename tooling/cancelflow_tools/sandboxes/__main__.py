"""Run one sandbox: `python -m cancelflow_tools.sandboxes vendor|gateway [--host H] [--port N] [--state-file P]`.

Loopback only unless told otherwise: the sandboxes have no authentication and accept fault rules.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aiohttp import web

from cancelflow.settings import CommonSettings
from cancelflow_tools.sandboxes.common import DEFAULT_HANG_SECONDS
from cancelflow_tools.sandboxes.gateway import build_gateway_app
from cancelflow_tools.sandboxes.vendor import build_vendor_app

BUILDERS = {"vendor": build_vendor_app, "gateway": build_gateway_app}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cancelflow_tools.sandboxes", description=__doc__)
    parser.add_argument("sandbox", choices=sorted(BUILDERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default: VENDOR_SANDBOX_PORT / GATEWAY_SANDBOX_PORT")
    parser.add_argument("--state-file", type=Path, help="JSON file to resume from and save to")
    parser.add_argument(
        "--hang-seconds",
        type=float,
        default=DEFAULT_HANG_SECONDS,
        help="how long a timeout rule holds a call",
    )
    return parser


def _default_port(sandbox: str) -> int:
    settings = CommonSettings()
    return settings.vendor_sandbox_port if sandbox == "vendor" else settings.gateway_sandbox_port


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    port = args.port if args.port is not None else _default_port(args.sandbox)
    app = BUILDERS[args.sandbox](args.state_file, hang_seconds=args.hang_seconds)
    # Hanging calls are released on shutdown, so a short grace period is enough for a quick Ctrl-C.
    web.run_app(app, host=args.host, port=port, shutdown_timeout=2.0, access_log=None)


if __name__ == "__main__":
    main()
