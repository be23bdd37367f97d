"""cancelflow.contract: the refund keys are the gateway's idempotency, so their formats are pinned here
letter for letter (a changed format would refund a redelivered line twice), and no service keeps a copy."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from cancelflow.contract import (
    CANCELLATION_REFUND_PREFIX,
    GuardCode,
    cancellation_refund_key,
    dispute_refund_key,
    retry_refund_key,
)
from cancelflow.events import ID_CHARS
from payment_gateway import orm as payment_orm

ROOT = Path(__file__).resolve().parents[2]


def test_the_key_formats_do_not_change() -> None:
    assert cancellation_refund_key("r-1", "ch-2") == "cf-refund-r-1-ch-2"
    assert retry_refund_key("r-1", "ch-2") == "cf-refund-retry-r-1-ch-2"
    assert dispute_refund_key("r-1", "ch-2") == "cf-dispute-r-1-ch-2"


def test_retries_count_as_cancellation_refunds_and_disputes_do_not() -> None:
    # The ledger finds a charge's earlier cancellation refunds by this prefix.
    assert CANCELLATION_REFUND_PREFIX == "cf-refund-"
    assert retry_refund_key("r", "c").startswith(CANCELLATION_REFUND_PREFIX)
    assert not dispute_refund_key("r", "c").startswith(CANCELLATION_REFUND_PREFIX)


def test_every_key_fits_the_refund_record() -> None:
    request_id, charge_id = str(uuid.uuid4()), "c" * ID_CHARS
    limit = payment_orm.refunds.c.idempotency_key.type.length
    for build in (cancellation_refund_key, retry_refund_key, dispute_refund_key):
        assert len(build(request_id, charge_id)) <= limit, build.__name__


def test_the_guard_codes_and_how_a_refusal_reads() -> None:
    assert [code.value for code in GuardCode] == [
        "insufficient_refundable_balance", "unexpected_idempotency_key", "unknown_charge", "charge_mismatch"]
    refusal = GuardCode.insufficient_refundable_balance.refused("0.00 USD of c1 is left")
    assert refusal == "insufficient_refundable_balance: 0.00 USD of c1 is left"
    assert GuardCode.insufficient_refundable_balance.refused_in(refusal)
    assert not GuardCode.insufficient_refundable_balance.refused_in("charge_disputed: open chargeback")
    assert not GuardCode.insufficient_refundable_balance.refused_in(None)


def test_no_service_keeps_a_copy() -> None:
    # A format written out for readers (`cf-dispute-<request_id>-...`) is no copy. invariants.py judges
    # refunds apart from the code it checks, on purpose: it keeps its own pattern.
    copy = re.compile(r"""["']((cf-refund-|cf-dispute-)(?!<)|insufficient_refundable_balance|unexpected_idempotency_key)""")
    allowed = {ROOT / "shared/cancelflow/contract.py", ROOT / "tooling/cancelflow_tools/invariants.py"}
    sources = [*ROOT.glob("services/*/*/**/*.py"), *ROOT.glob("shared/cancelflow/**/*.py")]
    found = [f"{path.relative_to(ROOT)}:{n}" for path in sources if path not in allowed
             for n, line in enumerate(path.read_text().splitlines(), 1) if copy.search(line)]
    assert found == []
