"""The dispute case on SQLite and PostgreSQL: the repository gives back the case it saved (states,
amounts, times in UTC) and writes only what a step changed; the handlers' flows hold on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cancelflow.db import create_schema, make_engine, transactions
from cancelflow.events import RequestedBy
from cancelflow.messaging.uow import UnitOfWork
from dispute import orm as dispute_orm
from dispute.domain import Case, Outcome, State
from dispute.repository import DisputeRepository
from payment_gateway import orm as payment_orm
from tests.unit.test_dispute_case import ACCOUNT, CHARGES, REQUEST, result, seen
from tests.unit.test_dispute_handlers import World, dispute_of, kinds


async def engine_on(url: str, orm: Any) -> AsyncEngine:
    engine = make_engine(url)
    await create_schema(engine, orm.metadata)
    return engine


@pytest.fixture
async def world(store: Any) -> AsyncIterator[World]:
    dispute = await engine_on(store("dispute"), dispute_orm)
    payment = await engine_on(store("payment_gateway"), payment_orm)
    yield World(dispute, payment)
    await dispute.dispose()
    await payment.dispose()


def unit(engine: AsyncEngine) -> UnitOfWork:
    return UnitOfWork(transactions(engine), dispute_orm.messaging, producer="test")


async def stored(engine: AsyncEngine, request_id: str) -> Case:
    async with unit(engine) as uow:
        case = await DisputeRepository(uow.db).get(request_id)
    assert case is not None
    return case


async def step(engine: AsyncEngine, act: Callable[[Case], None]) -> Case:
    """Load, act, save, as a handler does."""
    async with unit(engine) as uow:
        repo = DisputeRepository(uow.db)
        case = await repo.get(REQUEST)
        assert case is not None
        act(case)
        await repo.save(case)
        await uow.commit()
    return case


async def audit_steps(engine: AsyncEngine) -> list[tuple[str, str | None]]:
    table = dispute_orm.audit
    async with engine.connect() as conn:
        return [(r.step, r.charge_id) for r in await conn.execute(select(table.c.step, table.c.charge_id)
                                                                   .order_by(table.c.id))]


async def line_times(engine: AsyncEngine) -> dict[str, Any]:
    table = dispute_orm.dispute_charges
    async with engine.connect() as conn:
        return {r.charge_id: r.updated_at for r in await conn.execute(select(table.c.charge_id, table.c.updated_at))}


def without_records(case: Case) -> Case:
    case.steps, case.events = [], []
    return case


async def test_the_repository_gives_back_the_case_it_saved(world: World) -> None:
    engine = world.engines["dispute"]
    case = Case.open(request_id=REQUEST, account_id="acc-1", requested_by=RequestedBy(
        user_id="u-1", role="customer", channel="storefront"), reason=None, charge_ids=["b", "c"], window_hours=72,
        at=CHARGES["a"].captured_at)
    case.examine(CHARGES, ACCOUNT, 72)
    async with unit(engine) as uow:
        await DisputeRepository(uow.db).save(case)
        await uow.commit()

    loaded = await stored(engine, REQUEST)
    assert loaded == without_records(case)
    assert loaded.state is State.verifying and loaded.opened_at.tzinfo is not None
    assert [line.facts for line in loaded.lines] == [CHARGES["b"], CHARGES["c"]]

    # A step writes the lines it changed, and those only.
    before = await line_times(engine)
    await step(engine, lambda case: case.verified([seen("b"), seen("c", "disputed")]))
    after = await line_times(engine)
    assert after["b"] != before["b"] and after["c"] != before["c"]
    case = await step(engine, lambda case: case.refunds_issued([result("b")]))
    assert (await line_times(engine))["c"] == after["c"]  # the refund's outcome is b's only

    final = await stored(engine, REQUEST)
    assert final == without_records(case)
    assert (final.state, [line.outcome for line in final.lines]) == (
        State.manual_review, [Outcome.refunded, Outcome.manual_review])
    assert [row[0] for row in await audit_steps(engine)] == [
        "received", "validated", "detected", "detected", "gateway_verified", "gateway_verified",
        "refund_requested", "refund_issued", "escalated"]


async def test_a_duplicate_is_refunded_once_on_either_store(world: World) -> None:
    await world.capture("a", 3)
    await world.capture("b", 2)
    request = dispute_of("b")

    emitted = await world.deliver(request)
    again = await world.deliver(request)

    assert kinds(emitted)[-1] == "RefundIssued" and again == []
    assert len(world.refund_effects()) == 1
    assert await world.audit(request.request_id) == [
        ("received", None), ("validated", None), ("detected", "b"), ("gateway_verified", "b"),
        ("refund_requested", "b"), ("refund_issued", "b"), ("completed", None)]
    case = await stored(world.engines["dispute"], str(request.request_id))
    assert case.state is State.completed and case.lines[0].idempotency_key == f"cf-dispute-{request.request_id}-b"


async def test_mixed_and_rejected_cases_on_either_store(world: World) -> None:
    await world.capture("a", 3)
    await world.capture("b", 2)
    await world.capture("x", 2, account="acc-2")
    mixed, foreign = dispute_of("a", "b"), dispute_of("b", "x")

    assert kinds(await world.deliver(mixed))[-1] == "Failed"
    assert kinds(await world.deliver(foreign)) == ["Failed"]

    case = await stored(world.engines["dispute"], str(mixed.request_id))
    assert {line.charge_id: line.outcome for line in case.lines} == {"a": Outcome.manual_review,
                                                                    "b": Outcome.refunded}
    rejected = await stored(world.engines["dispute"], str(foreign.request_id))
    assert (rejected.state, rejected.error_code) == (State.rejected, "not_owner")
    assert rejected.lines[1].facts is None  # nothing of another account's charge is kept
