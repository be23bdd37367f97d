"""The `cancelflow` command line.

Commands are plain `@app.command()` functions in this file; nothing is built at import time (settings
are read when a command runs), so importing `app` stays cheap.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cancelflow.settings import CommonSettings
from cancelflow.topics import TOPICS

app = typer.Typer(
    name="cancelflow",
    help="Event-driven subscription cancellation: run the stack, create topics, send and follow requests.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _settings(**overrides: object) -> CommonSettings:
    return CommonSettings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def up(
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Where databases, mail and logs go (default: $CANCELFLOW_DATA_DIR or ./var)."
    ),
) -> None:
    """Start the whole stack in the foreground; Ctrl-C stops it."""
    from cancelflow.stack.embedded import run_stack

    raise typer.Exit(asyncio.run(run_stack(_settings(data_dir=data_dir), console=console)))


@app.command()
def topics(
    bootstrap: str | None = typer.Option(
        None,
        "--bootstrap",
        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS or the embedded broker).",
    ),
) -> None:
    """Create every topic (idempotent) and show them with their partitions and configs."""
    from cancelflow.stack.broker import BrokerError, create_topics, describe_topics

    bootstrap = bootstrap or _settings().bootstrap_servers

    async def create() -> tuple[list[str], dict[str, int]]:
        created = await create_topics(bootstrap)
        return created, await describe_topics(bootstrap, [t.name for t in TOPICS])

    try:
        created, partitions = asyncio.run(create())
    except BrokerError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    table = Table(title=f"topics on {bootstrap}")
    table.add_column("topic", no_wrap=True)
    for column in ("partitions", "configs", "key", "created now"):
        table.add_column(column)
    for t in TOPICS:
        configs = ", ".join(f"{k}={v}" for k, v in t.configs.items()) or "-"
        table.add_row(
            t.name, str(partitions.get(t.name, "?")), configs, t.key, "yes" if t.name in created else ""
        )
    console.print(table)


# Further commands (cancel, status, demo, ...) are added below as `@app.command()` functions.
