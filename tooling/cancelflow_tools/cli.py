"""The `cancelflow` command line.

Commands are plain `@app.command()` functions in this file; nothing is built at import time (settings
are read when a command runs), so importing `app` stays cheap.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cancelflow.settings import CommonSettings
from cancelflow.topics import TOPICS

if TYPE_CHECKING:
    from cancelflow_tools.ops import StackClient

app = typer.Typer(
    name="cancelflow",
    help="Event-driven subscription cancellation: run the stack, create topics, send and follow requests.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _settings(**overrides: object) -> CommonSettings:
    return CommonSettings(**{k: v for k, v in overrides.items() if v is not None})


class Broker(StrEnum):
    embedded = "embedded"
    kafka = "kafka"


def _broker_option() -> Any:
    return typer.Option(Broker.embedded, "--broker", envvar="CANCELFLOW_BROKER",
                        help="The broker the stack starts: `embedded` (zero-install) or `kafka` (Apache Kafka, "
                             "needs Java 17 and, once, Maven).")


def _use_broker(broker: Broker) -> None:
    """Every process this command starts (the stack, its services) runs on `broker`."""
    os.environ["CANCELFLOW_BROKER"] = broker.value


@app.command()
def up(
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Where databases, mail and logs go (default: $CANCELFLOW_DATA_DIR or ./var)."
    ),
    broker: Broker = _broker_option(),
) -> None:
    """Start the whole stack in the foreground; Ctrl-C stops it."""
    from cancelflow_tools.stack.embedded import run_stack

    _use_broker(broker)
    raise typer.Exit(asyncio.run(run_stack(_settings(data_dir=data_dir), console=console)))


@app.command()
def topics(
    bootstrap: str | None = typer.Option(
        None,
        "--bootstrap",
        help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS or the embedded broker).",
    ),
    replication_factor: int = typer.Option(
        1, "--replication-factor", min=1, envvar="KAFKA_TOPIC_REPLICATION_FACTOR",
        help="Replicas of each new topic: 1 for one broker, 3 for a production cluster.",
    ),
    retry_for: float = typer.Option(
        10.0, "--wait", min=0, help="Seconds to wait for the broker to answer (it may still be starting).",
    ),
    embedded: bool = typer.Option(
        False, "--embedded", help="The embedded broker (Tansu): some topics get fewer partitions there.",
    ),
) -> None:
    """Create every topic (idempotent) and show them with their partitions and configs."""
    from cancelflow_tools.stack.broker import BrokerError, create_topics, describe_topics

    bootstrap = bootstrap or _settings().bootstrap_servers

    async def create() -> tuple[list[str], dict[str, int]]:
        created = await create_topics(bootstrap, retry_for=retry_for, replication_factor=replication_factor,
                                      embedded=embedded)
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
    # Existing topics are left as they are: say when one has fewer partitions than declared (less
    # parallelism; adding partitions moves keys, so that is an operator's decision).
    short = [f"{t.name} ({partitions[t.name]} of {t.partitions_on(embedded=embedded)})" for t in TOPICS
             if partitions.get(t.name, t.partitions) < t.partitions_on(embedded=embedded)]
    if short:
        console.print(f"[yellow]fewer partitions than declared: {', '.join(short)}[/]")


@app.command()
def migrate(
    service: list[str] = typer.Option(
        [], "--service", help="Only this service (repeat); default: all six."
    ),
    sql: bool = typer.Option(
        False, "--sql", help="Print the SQL that takes an empty database to the latest revision; run nothing."
    ),
) -> None:
    """Upgrade each service's PostgreSQL database (<SERVICE>_DATABASE_URL) to its latest migration.

    Services also do this when they start; run it first when the services' database users may not
    change the schema. SQLite stores (the embedded default) are created by the services themselves."""
    import importlib

    from cancelflow import db, migrations
    from cancelflow_tools.services import SERVICES, service_settings

    unknown = sorted(set(service) - set(SERVICES))
    if unknown:
        console.print(f"[red]unknown service(s): {', '.join(unknown)}[/] (one of {', '.join(SERVICES)})")
        raise typer.Exit(2)
    chosen = [s for s in SERVICES if not service or s in service]
    if sql:
        for name in chosen:
            package = migrations.package_for(name)
            if package is not None:
                print(f"-- {name}\n{migrations.upgrade_sql(package)}")
        return

    async def upgrade(name: str, url: str) -> str | None:
        engine = db.make_engine(url)
        try:
            orm = importlib.import_module(f"{name}.orm")
            return await migrations.upgrade_to_head(engine, f"{name}.migrations", orm.metadata)
        finally:
            await engine.dispose()

    table = Table(title="database migrations")
    table.add_column("service")
    table.add_column("revision")
    for name in chosen:
        url = service_settings(name).database_url()
        if db.is_sqlite(url) or migrations.package_for(name) is None:
            table.add_row(name, "SQLite: created by the service on start")
            continue
        try:
            revision = asyncio.run(upgrade(name, url))
        except Exception as exc:
            console.print(f"[red]{name}: migration failed: {escape(repr(exc))}[/]")
            raise typer.Exit(1) from None
        table.add_row(name, revision or "-")
    console.print(table)


def _endpoints():  # type: ignore[no-untyped-def]
    from cancelflow_tools.ops import Endpoints

    return Endpoints.from_env(_settings())


def _resolution(resolution: dict | None) -> str | None:
    if not resolution:
        return None
    said = f"{resolution['action']} by {resolution['by']} at {resolution['at']}"
    said += f": {resolution['note']}" if resolution.get("note") else ""
    return said + (f" (new request {resolution['request_id']})" if resolution.get("request_id") else "")


def print_status(status: dict) -> None:
    """A request's status record as support reads it: the view, then its history."""
    error = status.get("error")
    refund = status.get("refund")
    resolution = status.get("resolution")
    view = Table(show_header=False, title=f"request {status['request_id']}")
    view.add_column("field", style="bold")
    view.add_column("value")
    rows = [
        ("state", status["state"] + (f" (stage {status['stage']})" if status.get("stage") else "")),
        ("account", status.get("account_id")),
        ("target", status.get("subscription_id") or ", ".join(status.get("charge_ids") or [])),
        ("mode", status.get("mode")),
        ("subscription status", status.get("subscription_status")),
        ("provisioning status", status.get("provisioning_status")),
        ("effective date", status.get("effective_date")),
        ("access ends", status.get("access_end_date")),
        ("refund", f"{refund['amount']} {refund['currency']} ({refund['status']})" if refund else "-"),
        ("error", f"{error['source']} / {error['code']}: {error['message']}" if error else "-"),
        ("resolution", f"{resolution['action']}, by {resolution['by']}: {resolution['note']}" if resolution else "-"),
        ("version", str(status.get("version"))),
        ("retry of", status.get("retry_of")),
        ("resolution", _resolution(status.get("resolution"))),
    ]
    for name, value in rows:
        view.add_row(name, escape(str(value)) if value is not None else "-")
    console.print(view)
    history = Table(title="history")
    history.add_column("at", no_wrap=True)
    history.add_column("message")
    for entry in status.get("history", []):
        history.add_row(entry["at"], escape(entry["message"]))
    console.print(history)


@app.command()
def cancel(
    account: str = typer.Option(..., "--account", help="The account asking (must own the target)."),
    subscription: str | None = typer.Option(None, "--subscription", help="Target subscription id."),
    charge: list[str] = typer.Option([], "--charge", help="A disputed charge id (repeat); target = charges."),
    mode: str = typer.Option("immediate", "--mode", help="immediate | past_dated | end_of_term"),
    effective_date: str | None = typer.Option(None, "--effective-date", help="YYYY-MM-DD, for past_dated."),
    quantity: int | None = typer.Option(None, "--quantity", help="Licenses to remove (partial cancellation)."),
    reason: str = typer.Option("", "--reason"),
    role: str = typer.Option("customer", "--role", help="customer | operator"),
    channel: str = typer.Option("storefront", "--channel", help="storefront | bss"),
    user: str = typer.Option("cli", "--user", help="requested_by.user_id"),
    requires_approval: bool = typer.Option(False, "--requires-approval"),
    opt_out: bool = typer.Option(False, "--opt-out-of-emails"),
    request_id: str | None = typer.Option(None, "--request-id", help="Reuse an id (a repeat has no new effect)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the outcome and print it; exit 0 when it completed "
                              "(or waits for its end of term or an operator), 1 when it ended otherwise."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait with --wait."),
    on_behalf: bool = typer.Option(False, "--on-behalf", help="As a support operator, through the status "
                                   "service (POST /cancellations, CANCELFLOW_TOKEN); --reason is required."),
) -> None:
    """Publish a CancellationRequested on cancellations.requested, as an upstream app would; with
    --on-behalf, ask the status service to, as the signed-in operator."""
    import uuid
    from datetime import date

    from pydantic import ValidationError

    from cancelflow_tools.ops import StackClient, StatusWatcher

    if not subscription and not charge:
        console.print("[red]give --subscription or at least one --charge[/]")
        raise typer.Exit(2)

    async def send() -> dict | None:
        endpoints = _endpoints()
        async with StackClient(endpoints, producer_name=channel) as stack:
            watcher = StatusWatcher(endpoints.bootstrap) if wait else None
            if watcher:
                await watcher.__aenter__()
            try:
                if on_behalf:
                    rid = await _on_behalf(stack)
                    return await watcher.wait_for(rid, _settled, timeout) if watcher else None
                rid = await stack.request_cancellation(
                    account_id=account, subscription_id=subscription, mode=mode,
                    effective_date=date.fromisoformat(effective_date) if effective_date else None,
                    quantity=quantity, charge_ids=charge, user_id=user, role=role, channel=channel,
                    reason=reason, requires_approval=requires_approval, opt_out_of_emails=opt_out,
                    request_id=uuid.UUID(request_id) if request_id else None)
                console.print(f"published CancellationRequested [bold]{rid}[/]")
                return await watcher.wait_for(rid, _settled, timeout) if watcher else None
            finally:
                if watcher:
                    await watcher.__aexit__(None, None, None)

    async def _on_behalf(stack: StackClient) -> str:
        body = {"account_id": account, "target": "charges" if charge else "subscription",
                "subscription_id": subscription, "charge_ids": charge, "mode": mode, "effective_date": effective_date,
                "quantity": quantity, "reason": reason, "requires_approval": requires_approval,
                "opt_out_of_emails": opt_out}
        code, answer = await stack.act("/cancellations", body)
        if code != 202:
            raise _Refused(code, answer)
        console.print(f"requested on the customer's behalf: [bold]{answer['request_id']}[/]")
        return str(answer["request_id"])

    try:
        status = asyncio.run(send())
    except _Refused as refused:
        refused.report()
        raise typer.Exit(refused.exit_code) from None
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]not a valid request:[/] {exc}")
        raise typer.Exit(2) from None
    except TimeoutError as exc:
        console.print(f"[yellow]{exc}[/]")
        raise typer.Exit(3) from None
    if status is not None:
        print_status(status)
        if status["state"] not in _WAITING and status["state"] != "completed":
            raise typer.Exit(1)


class _Refused(Exception):
    """The status service said no to an operator's action."""

    def __init__(self, code: int, answer: object) -> None:
        super().__init__(code)
        self.code = code
        self.answer = answer

    @property
    def exit_code(self) -> int:
        return 4 if self.code in (401, 403) else 2 if self.code in (400, 404) else 1

    def report(self) -> None:
        error = self.answer.get("error") if isinstance(self.answer, dict) else self.answer
        hint = " (set CANCELFLOW_TOKEN to an operator's token)" if self.code in (401, 403) else ""
        console.print(f"[red]refused ({self.code}):[/] {escape(str(error))}{hint}")


def _act(request_id: str, action: str, body: dict) -> None:
    """POST /requests/{id}/{action} as the operator of CANCELFLOW_TOKEN (or the embedded stack's)."""
    from cancelflow_tools.ops import StackClient

    async def send() -> tuple[int, object]:
        async with StackClient(_endpoints()) as stack:
            return await stack.act(f"/requests/{request_id}/{action}", body)

    try:
        code, answer = asyncio.run(send())
    except OSError as exc:
        console.print(f"[red]the status service does not answer: {exc}[/] (is `cancelflow up` running?)")
        raise typer.Exit(1) from None
    if code != 202:
        refused = _Refused(code, answer)
        refused.report()
        raise typer.Exit(refused.exit_code)
    assert isinstance(answer, dict)
    new = f"; new request [bold]{answer['request_id']}[/]" if answer.get("retry_of") else ""
    console.print(f"{answer.get('action', action)} accepted for {request_id}{new}")


NOTE = typer.Option("", "--note", help="Why (kept in the request's history and the audit trail).")


@app.command()
def approve(request_id: str = typer.Argument(..., help="A request pending approval."), note: str = NOTE) -> None:
    """Approve a request that waits for an operator (CONTRACT.md section 11)."""
    _act(request_id, "approve", {"note": note})


@app.command()
def decline(request_id: str = typer.Argument(..., help="A request pending approval."), note: str = NOTE) -> None:
    """Decline a request that waits for an operator; the customer is told."""
    _act(request_id, "decline", {"note": note})


@app.command()
def retry(request_id: str = typer.Argument(..., help="A failed request (vendor or platform)."),
          note: str = NOTE) -> None:
    """Retry a failed request as a new request for the same target and options (prints its id)."""
    _act(request_id, "retry", {"note": note})


@app.command()
def resolve(request_id: str = typer.Argument(..., help="A request in manual review."),
            action: str = typer.Option(..., "--action", help="retry_refund | close"), note: str = NOTE) -> None:
    """Resolve a manual review: try the refused refund again (retry_refund), or close it with a note."""
    _act(request_id, "resolve", {"action": action, "note": note})


# Where a request waits for something outside the stack: its end of term, or an operator's decision.
_WAITING = ("scheduled", "pending_approval")


def _settled(status: dict) -> bool:
    from cancelflow_tools.ops import is_terminal

    return is_terminal(status) or status["state"] in _WAITING


@app.command()
def sample(
    account: str = typer.Option(..., "--account", help="The account that owns it."),
    subscription: str = typer.Option(..., "--subscription", help="The subscription id."),
    quantity: int = typer.Option(1, "--quantity", help="Licenses."),
    price: str = typer.Option("30.00", "--price", help="Price of one license for the period (USD)."),
    days_into_period: int = typer.Option(10, "--days-into-period", help="Days of the 30-day period gone by."),
    trial: bool = typer.Option(False, "--trial", help="A trial: no charge, never refunded."),
    duplicate_charges: int = typer.Option(0, "--duplicate-charges",
                                          help="Capture the period's charge this many more times."),
) -> None:
    """Load a sample subscription and its charge into the running stack, as the upstream platform and the
    gateway would (something to cancel)."""
    from datetime import UTC, datetime

    from cancelflow_tools.ops import StackClient, sample_subscription, with_duplicate_charges

    made = with_duplicate_charges(sample_subscription(
        account_id=account, subscription_id=subscription, today=datetime.now(UTC).date(), price=price,
        quantity=quantity, days_into_period=days_into_period, status="trial" if trial else "active"),
        duplicate_charges)

    async def load() -> None:
        async with StackClient(_endpoints()) as stack:
            await stack.load_for_dispute([made], timeout=60)

    try:
        with console.status("publishing the subscription and its charges, waiting for the services to have them ..."):
            asyncio.run(load())
    except (OSError, TimeoutError) as exc:
        console.print(f"[red]the stack did not take it: {exc}[/] (is `cancelflow up` running?)")
        raise typer.Exit(1) from None
    facts = made.facts
    table = Table(title=f"subscription {facts.subscription_id} of account {facts.account_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("status", facts.status)
    table.add_row("licenses", f"{facts.quantity} at {facts.unit_price} {facts.currency}")
    table.add_row("period", f"{facts.current_period_start} to {facts.current_period_end}")
    for charge in made.charges:
        table.add_row("charge", f"{charge.charge_id}: {charge.amount} {charge.currency}, "
                                f"captured {charge.captured_at:%Y-%m-%d %H:%M}")
    console.print(table)


@app.command()
def status(request_id: str = typer.Argument(..., help="The cancellation request id.")) -> None:
    """Print a request's current status and history (from the status service)."""
    print_status(_fetch_one("status", "request", lambda stack: stack.status(request_id), request_id))


@app.command()
def demo(
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Data dir of the stack to use or start."),
    timeout: float = typer.Option(90.0, "--timeout", help="Seconds to wait for each outcome."),
    broker: Broker = _broker_option(),
) -> None:
    """Run the seed release note's three scenarios and a past-dated cancellation, then show the outcomes.

    Uses the stack running on the data dir, or starts one for the demo and stops it afterwards."""
    from cancelflow_tools.demo import expected_outcomes_met, run_demo
    from cancelflow_tools.stack.embedded import run_stack, running_stack

    _use_broker(broker)
    settings = _settings(data_dir=data_dir)
    endpoints = _endpoints()
    if running_stack(settings):
        plan = asyncio.run(run_demo(endpoints, console, timeout=timeout))
    else:
        console.print("no stack runs on this data dir: starting one for the demo")
        outcome: dict = {}

        async def start_and_run() -> int:
            stop = asyncio.Event()

            async def on_ready(_info: dict) -> None:
                try:
                    outcome["plan"] = await run_demo(endpoints, console, timeout=timeout)
                finally:
                    stop.set()

            return await run_stack(settings, on_ready=on_ready, console=console, stop=stop)

        code = asyncio.run(start_and_run())
        if "plan" not in outcome:
            raise typer.Exit(code or 1)
        plan = outcome["plan"]
    if not expected_outcomes_met(plan, console):
        raise typer.Exit(1)


def print_dispute(found: dict) -> None:
    """A charges dispute as support reads it: the case, each listed charge's outcome, the audit trail."""
    case = found["dispute"]
    view = Table(show_header=False, title=f"dispute {case['request_id']}")
    view.add_column("field", style="bold")
    view.add_column("value")
    for name, value in [("state", case["state"]), ("account", case["account_id"]),
                        ("requested by", case["requested_by"]), ("reason", case.get("reason")),
                        ("duplicate window", f"{case['window_hours']} h"), ("error", case.get("error_code")),
                        ("opened", case["created_at"]), ("updated", case["updated_at"])]:
        view.add_row(name, escape(str(value)) if value is not None else "-")
    console.print(view)
    charges = Table(title="listed charges")
    for column in ("charge", "amount", "captured at", "duplicate", "gateway", "outcome", "refund", "reason"):
        charges.add_column(column, no_wrap=column in ("charge", "amount"))
    for line in found["charges"]:
        amount = f"{line['amount']} {line['currency']}" if line.get("amount") is not None else "-"
        refund = " ".join(str(v) for v in (line.get("refund_kind"), line.get("refund_id")) if v) or "-"
        reason = line["detail"] if line["outcome"] != "refunded" else f"duplicate of {line.get('related_charge_id')}"
        charges.add_row(*(escape(str(v)) if v is not None else "-" for v in (
            line["charge_id"], amount, line.get("captured_at"), line["duplicate"], line.get("gateway_state"),
            line["outcome"], refund, reason)))
    console.print(charges)
    trail = Table(title="audit trail")
    for column in ("at", "step", "actor", "charge", "message"):
        trail.add_column(column, no_wrap=column in ("at", "step"))
    for entry in found["audit"]:
        trail.add_row(*(escape(str(v)) if v is not None else "-" for v in (
            entry["at"], entry["step"], entry["actor"], entry.get("charge_id"), entry["message"])))
    console.print(trail)


@app.command()
def dispute(request_id: str = typer.Argument(..., help="The request id of a charges dispute.")) -> None:
    """Print a duplicate-charge dispute: each listed charge's outcome and the audit trail of every step."""
    print_dispute(_fetch_one("dispute", "dispute", lambda stack: stack.dispute(request_id), request_id))


def _fetch_one(service: str, what: str, read: Callable[[StackClient], Awaitable[dict | None]], ident: str) -> dict:
    """One record from a running stack's service, or a clear line and exit 1 (not running, not found)."""
    from aiokafka.errors import KafkaConnectionError

    from cancelflow_tools.ops import StackClient

    async def fetch() -> dict | None:
        async with StackClient(_endpoints()) as stack:
            return await read(stack)

    try:
        found = asyncio.run(fetch())
    except (OSError, KafkaConnectionError) as exc:
        console.print(f"[red]the {service} service does not answer: {exc}[/] (is `cancelflow up` running?)")
        raise typer.Exit(1) from None
    if found is None:
        console.print(f"[yellow]no {what} {ident}[/]")
        raise typer.Exit(1)
    return found


@app.command()
def chaos(
    duration: float = typer.Option(60.0, "--duration", help="Seconds of traffic under faults."),
    rate: float = typer.Option(4.0, "--rate", help="Cancellations per second."),
    kill_every: float = typer.Option(10.0, "--kill-every", help="Seconds between kill -9 of a random service (0: none)."),
    smtp_outage: float = typer.Option(15.0, "--smtp-outage", help="Seconds SMTP is down, once (0: never)."),
    broker_pause: float = typer.Option(10.0, "--broker-pause", help="Seconds the broker is SIGSTOPped, once (0: never)."),
    rebalance: float = typer.Option(10.0, "--rebalance", help="Seconds a second instance of a service stays in its "
                                    "consumer group, once (0: never)."),
    seed: int = typer.Option(7, "--seed", help="Random seed of scenarios and kills."),
    broker_kills: int = typer.Option(0, "--broker-kills", min=0,
                                     help="kill -9 of the broker this many times, spread over the run; the stack "
                                          "starts it again on its log (Apache Kafka only)."),
    data_dir: Path = typer.Option(Path("var"), "--data-dir", help="Where the run's own stack keeps its data."),
    broker: Broker = _broker_option(),
) -> None:
    """Soak test: a stack of its own under a steady stream of requests, kill -9 of random services, the
    broker paused, SMTP down, poison records and every named crash point; then every invariant is checked
    over the topics, sandbox ledgers, mailbox and databases. Exits 1 on any violation."""
    from cancelflow_tools.chaos import ChaosConfig, ChaosRun, chaos_env, data_dir_for, render
    from cancelflow_tools.testing.smtp import RecordingSMTPServer
    from cancelflow_tools.testing.stack import StackProcess

    if broker_kills and broker is not Broker.kafka:
        raise typer.BadParameter("--broker-kills needs --broker kafka: the embedded broker keeps nothing across a kill")
    _use_broker(broker)
    config = ChaosConfig(duration_s=duration, rate_per_s=rate, kill_every_s=kill_every,
                         smtp_outage_s=smtp_outage, broker_pause_s=broker_pause, rebalance_s=rebalance, seed=seed,
                         broker_kills=broker_kills, settle_timeout_s=max(300.0, duration * 2))
    _stop_cleanly_on_sigterm()
    run_dir = data_dir_for(data_dir.resolve())
    with RecordingSMTPServer() as smtp:
        stack = StackProcess(run_dir, extra_env=chaos_env(smtp.port, on_kafka=broker is Broker.kafka))
        with console.status(f"starting a stack in {run_dir} ..."):
            stack.start()
        try:
            with console.status(f"loading subscriptions, {duration:.0f} s of traffic under faults, "
                                f"then settling and checking ..."):
                result = asyncio.run(ChaosRun(stack, smtp, config, console).run())
        finally:
            stack.stop()
    render(result, console)
    console.print(f"data, logs and mail of the run: {run_dir}")
    if not result.report.ok:
        raise typer.Exit(1)


def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (kill, pkill, a CI timeout) ends a run like Ctrl-C does: through its `finally` blocks,
    which stop the stack it started. Without this, the stack and every service keep running."""
    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


@app.command()
def bench(
    requests: int = typer.Option(500, "--requests", help="Cancellations in the burst (and subscriptions loaded)."),
    rate: float = typer.Option(100.0, "--rate", help="Rate of the paced run, per second."),
    paced: int = typer.Option(300, "--paced", help="Cancellations in the paced run (0: skip it)."),
    pg: bool = typer.Option(False, "--pg", help="Every service on its own PostgreSQL database (pgserver)."),
    instances: int = typer.Option(1, "--instances", min=1, max=4,
                                  help="Processes of every service, in the same consumer groups (scale-out)."),
    json_out: bool = typer.Option(False, "--json", help="End with one JSON line of the figures."),
    data_dir: Path = typer.Option(Path("var"), "--data-dir", help="Where the run's own stack keeps its data."),
    fetch_wait_ms: int | None = typer.Option(
        None, "--fetch-wait-ms", min=1,
        help="The services' fetch wait (CANCELFLOW_FETCH_MAX_WAIT_MS); default: the embedded stack's."),
    running: bool = typer.Option(
        False, "--running", help="Use the stack `cancelflow up` runs with this environment (its own sandboxes and "
                                 "SMTP sink) instead of starting one; it is left running."),
    broker: Broker = _broker_option(),
) -> None:
    """Completed cancellations per second (with refunds and emails) on a stack of its own, latency
    percentiles as fast as possible and paced, per-service CPU and peak RSS, and the same number of
    messages through plain aiokafka relays over the same number of hops, for the ratio. The run's
    results are then checked with the reliability invariants; the command exits 1 on a violation."""
    import json
    from datetime import UTC, datetime

    from cancelflow_tools.bench import (
        BenchResult,
        machine,
        measure_baseline,
        measure_system,
        reference_us,
        render,
    )
    from cancelflow_tools.testing.stack import StackProcess

    _use_broker(broker)
    _stop_cleanly_on_sigterm()
    box = machine()  # and its reference speed again after the runs: the machine's speed drifts
    server = None
    if running:
        if pg or fetch_wait_ms:
            raise typer.BadParameter("--running measures the stack as it runs: no --pg or --fetch-wait-ms")
        try:
            stack = StackProcess.attach()
        except RuntimeError as exc:
            raise typer.BadParameter(str(exc)) from None
        if stack.info.get("mail_dir") is None or stack.settings.vendor_api_url or stack.settings.gateway_api_url:
            raise typer.BadParameter("the running stack uses a real vendor, gateway or mail server: the bench loads "
                                     "subscriptions into the sandboxes and reads the SMTP sink's mailbox")
        fetch_wait_ms = stack.settings.fetch_max_wait_ms  # what this environment says the stack runs with
        broker = Broker(stack.info.get("broker", "embedded"))
    else:
        run_dir = data_dir.resolve() / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%S}"
        # The embedded stack as `cancelflow up` runs it (the test stack's shorter wait would be measured
        # otherwise), or the wait asked for.
        fetch_wait_ms = fetch_wait_ms or CommonSettings().fetch_max_wait_ms
        env = {"CANCELFLOW_FETCH_MAX_WAIT_MS": str(fetch_wait_ms)}
        if pg:
            import pgserver

            from cancelflow_tools.services import SERVICES

            run_dir.mkdir(parents=True, exist_ok=True)
            server = pgserver.get_server(run_dir / "pg", cleanup_mode="stop")
            socket_dir = server.get_uri().split("host=", 1)[1]
            for service, (prefix, _) in SERVICES.items():
                server.psql(f"CREATE DATABASE bench_{service};")
                env[f"{prefix}_DATABASE_URL"] = f"postgresql+asyncpg://postgres@/bench_{service}?host={socket_dir}"
        stack = StackProcess(run_dir, extra_env=env)
        with console.status(f"starting a stack in {run_dir} ..."):
            stack.start()
    try:
        run = asyncio.run(measure_system(stack, requests, rate, paced, console, instances=instances))
        with console.status(f"bare broker: {requests} messages through the same hops ..."):
            baseline = asyncio.run(measure_baseline(stack.endpoints.bootstrap, requests))
    finally:
        stack.stop()  # a stack we attached to is left running
        if server is not None:
            server.cleanup()
    store = "sqlite" if all(url.startswith("sqlite") for url in stack.database_urls().values()) else "postgresql"
    result = BenchResult(run.burst, run.paced, baseline, run.usage, run.harness, store=store, broker=broker.value,
                         instances=instances,
                         fetch_wait_ms=fetch_wait_ms, violations={k: v for k, v in run.report.violations.items() if v},
                         machine={**box, "reference_us": [*box["reference_us"], reference_us()]})
    render(result, console)
    if json_out:
        print(json.dumps(result.summary()))
    if result.violations:
        raise typer.Exit(1)
