"""What the stack exposes: no customer PII in logs, the dead-letter queue or metrics (a canary
customer goes through every path), and every port it opens listens on loopback only."""

from __future__ import annotations

import base64

import orjson
import pytest

from cancelflow import topics
from cancelflow.events import envelope_for
from cancelflow.messaging.codec import encode
from cancelflow_tools.ops import sample_subscription
from cancelflow_tools.services import SERVICES
from tests.e2e.test_cancellation_flow import _finish, _read_topic

pytestmark = [pytest.mark.e2e, pytest.mark.broker_agnostic]

CANARY_EMAIL = "zebulon.canary.7f3e@pii-canary.example"
CANARY_NAME = "Zebulon Canarywood"


async def test_customer_email_and_name_never_reach_logs_dlq_or_metrics(client, watcher, stack, smtp, ids, today):
    tag = ids["tag"]
    samples = [sample_subscription(account_id=ids["account"], subscription_id=f"sub-pii{n}-{tag}", today=today,
                                   email=CANARY_EMAIL, name=CANARY_NAME) for n in range(3)]
    await client.load(samples)
    ok, vendor_fails, platform_fails = samples
    await client.post_json(f"{client.endpoints.vendor}/_sandbox/rules", {
        "match": {"vendor_subscription_id": vendor_fails.facts.vendor_subscription_id},
        "respond": {"status": 422, "error": "locked"}, "times": 1})
    await client.post_json(f"{client.endpoints.billing}/_faults",
                           {"subscription_id": platform_fails.facts.subscription_id, "stage": "commit"})
    rids = [await client.request_cancellation(account_id=ids["account"], subscription_id=s.facts.subscription_id)
            for s in samples]
    # A broken record full of PII, dead-lettered (a SubscriptionActivated missing its product).
    broken = orjson.loads(encode(envelope_for(ok.facts, producer="platform", correlation_id="x", causation_id=None)))
    del broken["payload"]["product_name"]
    poison_key = f"sub-pii-poison-{tag}"
    await client.publisher.send_raw(topics.PLATFORM_SUBSCRIPTIONS, orjson.dumps(broken), key=poison_key)
    for rid in rids:
        await _finish(watcher, rid)
    assert any(CANARY_EMAIL in m["To"] for m in smtp.messages), "the canary did get its emails"

    dead = await _read_topic(stack.endpoints.bootstrap, topics.DLQ, lambda r: r.key == poison_key.encode(), 1)
    dlq_text = dead[0].value.decode() + base64.b64decode(orjson.loads(dead[0].value)["payload"]["original_base64"]).decode()
    assert "product_name" in dlq_text  # it is the record, just without the customer
    metrics = []
    for prefix, _ in SERVICES.values():
        _, text = await client.get_json(f"http://127.0.0.1:{stack.env[f'{prefix}_HTTP_PORT']}/metrics")
        metrics.append(text)
    logs = [p.read_text(errors="replace") for p in (stack.data_dir / "logs").glob("*.log")]

    for where, text in [("dlq", dlq_text), ("metrics", "\n".join(metrics)), ("logs", "\n".join(logs))]:
        assert CANARY_EMAIL not in text, f"customer email found in {where}"
        assert CANARY_NAME not in text and "Canarywood" not in text, f"customer name found in {where}"


def _listening_addresses() -> dict[int, set[str]]:
    """Port -> local addresses of listening TCP sockets (IPv4 and IPv6), read from /proc/net."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            found.setdefault(int(port, 16), set()).add(address)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


def test_every_port_of_the_stack_listens_on_loopback_only(stack):  # type: ignore[no-untyped-def]
    ports = {int(stack.env[f"{prefix}_HTTP_PORT"]) for prefix, _ in SERVICES.values()}
    ports |= {int(stack.env[k]) for k in ("VENDOR_SANDBOX_PORT", "GATEWAY_SANDBOX_PORT", "CANCELFLOW_BROKER_PORT")}
    listening = _listening_addresses()
    for port in sorted(ports):
        assert port in listening, f"nothing listens on {port}"
        assert listening[port] <= LOOPBACK, f"port {port} listens on {listening[port]}, not loopback only"
