"""Generate schemas/ from the event models: one JSON Schema per event type and version, plus a README.

    python scripts/gen_schemas.py            # (re)write schemas/
    python scripts/gen_schemas.py --check    # exit 1 and list what differs; writes nothing

The models in `cancelflow.events.REGISTRY` are the source of truth; schemas/ is their published form.
Output is deterministic (sorted keys, stable order, trailing newline), so regenerating gives identical
bytes and tests/unit/test_schemas.py can fail when someone changes a model without regenerating.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from cancelflow.events import REGISTRY, Envelope, Payload
from cancelflow.topics import BY_NAME, TOPICS, Topic

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = ROOT / "schemas"
README = "README.md"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
# Validation mode: a schema states what a consumer accepts, i.e. what a producer must send.
MODE = "validation"

# Used only while a payload class has no docstring of its own; the docstring wins once it is written.
FALLBACK_DESCRIPTIONS = {
    "SubscriptionActivated": (
        "Upstream platform fact: a subscription is active (or in trial) with these facts; a later one "
        "for the same subscription_id replaces them. current_period_end (exclusive) must be after "
        "current_period_start."
    ),
    "ChargeCaptured": (
        "Upstream payment fact: the gateway captured a charge that pays for the billing period "
        "[period_start, period_end) of a subscription."
    ),
    "CancellationRequested": (
        "An upstream app (storefront, BSS) asks to cancel a subscription, whole or some licenses "
        "(target subscription, needs subscription_id), or to refund charges taken more than once "
        "(target charges, needs charge_ids). A repeated request_id causes no new effect."
    ),
    "CancellationApproved": "An operator accepted a request that is pending_approval; it goes ahead.",
    "CancellationDeclined": "An operator declined a request that is pending_approval; it ends declined.",
}


# --- one schema per event type and version -----------------------------------------------------


def file_name(cls: type[Payload]) -> str:
    return f"{cls.event_type}.v{cls.schema_version}.json"


def description(cls: type[Payload]) -> str:
    own = cls.__dict__.get("__doc__")
    if own:
        return inspect.cleandoc(own)
    return FALLBACK_DESCRIPTIONS.get(cls.event_type, f"{cls.event_type}, version {cls.schema_version}.")


def one_line(cls: type[Payload]) -> str:
    first_paragraph = description(cls).split("\n\n")[0]
    return " ".join(first_paragraph.split())


def record_key(cls: type[Payload]) -> str:
    # A class that computes its key (rather than reading one field) is described by its topic's key.
    if cls.record_key is not Payload.record_key:
        return BY_NAME[cls.topic].key
    return cls.key_field


def record_schema(cls: type[Payload]) -> dict[str, Any]:
    """The whole record as it travels: the envelope, with this event's type, version and payload."""
    envelope = Envelope.model_json_schema(mode=MODE)
    payload = cls.model_json_schema(mode=MODE)
    defs = payload.pop("$defs", {})
    payload.setdefault("description", description(cls))
    properties = dict(envelope["properties"])
    properties["event_type"] = {"const": cls.event_type, "title": "Event Type", "type": "string"}
    properties["schema_version"] = {"const": cls.schema_version, "title": "Schema Version", "type": "integer"}
    properties["payload"] = payload
    schema: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": f"urn:cancelflow:schemas:{cls.event_type}.v{cls.schema_version}",
        "title": f"{cls.event_type} v{cls.schema_version}",
        "description": description(cls),
        "type": "object",
        "properties": properties,
        "required": envelope["required"],
        "x-topic": cls.topic,
        "x-key": record_key(cls),
    }
    if defs:
        schema["$defs"] = defs
    return schema


def dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --- the README --------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _events_by_topic() -> dict[str, list[type[Payload]]]:
    grouped: dict[str, list[type[Payload]]] = {t.name: [] for t in TOPICS}
    for cls in REGISTRY.values():
        if cls.topic not in grouped:
            raise SystemExit(f"{cls.__name__} is on topic {cls.topic!r}, which topics.TOPICS does not list")
        grouped[cls.topic].append(cls)
    return grouped


def _partitions(t: Topic) -> str:
    embedded = t.partitions_on(embedded=True)
    return str(t.partitions) if embedded == t.partitions else f"{t.partitions} ({embedded} on the embedded broker)"


def _configs(topic: Topic) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted(topic.configs.items())) or "defaults"


_HEAD = """\
# Event schemas

Generated by `python scripts/gen_schemas.py` from the pydantic models in
`shared/cancelflow/events.py` (`REGISTRY`) and the topic list in `shared/cancelflow/topics.py`.
Do not edit anything in this folder by hand: change the models, then regenerate.

## Regenerating

```sh
python scripts/gen_schemas.py           # rewrite schemas/ (removes files no model produces)
python scripts/gen_schemas.py --check   # exit 1 and list stale, missing or extra files; writes nothing
```

`tests/unit/test_schemas.py` runs the same comparison, so a model change without regenerated schemas
fails the tests. Output is deterministic: keys sorted, two-space indent, trailing newline.

## What a schema file describes

`<EventType>.v<version>.json` is a JSON Schema (draft 2020-12) of the **whole record value** as it
travels on Kafka: the envelope, with `event_type` and `schema_version` fixed by `const`, and `payload`
set to that event's own schema. Shared sub-objects live under `$defs`. Two custom keywords say where
the record goes: `x-topic` (the topic) and `x-key` (the record key: a payload field, or a description
when the key depends on the payload).

The schemas are generated in pydantic's **validation** mode: they state what a consumer accepts, which
is what a producer must send. A field with a default is optional (cancelflow's own producers always
write every field). No schema sets `additionalProperties: false`: unknown extra fields are ignored,
so adding an optional field is a compatible change within a version; removing or retyping one needs
a new `schema_version` (a new file here, with the old one kept while it is still produced).
Rules that span several fields (for example `current_period_end` after `current_period_start`, or
`target: subscription` needing `subscription_id`) are stated in the descriptions and checked by the
consumers, not by the schema. `format` (`uuid`, `date`, `date-time`) is an annotation unless the
validator is asked to check formats.

## The envelope

Every record on every topic is one UTF-8 JSON object:

| field | type | meaning |
|---|---|---|
| `event_id` | string (UUID) | unique per event; consumers deduplicate on it |
| `event_type` | string | the event's name, e.g. `CancellationRequested` |
| `schema_version` | integer | starts at 1; a consumer accepts the versions it knows and dead-letters the rest |
| `occurred_at` | RFC 3339 timestamp, UTC | when the fact happened |
| `correlation_id` | string | the cancellation `request_id` for everything a request causes |
| `causation_id` | string or null | `event_id` of the event that caused this one |
| `producer` | string | who wrote it (`storefront`, `bss`, `billing`, ...) |
| `payload` | object | the event's own fields (the schema files below) |

## Conventions

- **Money** is a decimal string with two places (`"49.95"`), always next to an ISO 4217 `currency`
  (`"EUR"`); the schemas say exactly that, and it is what every producer must write. JSON numbers are
  not money: a fraction would pick up binary rounding. (The consumers are a little more lenient than
  the schema, normalising `"49.9"` or an integer to two places, so old producers keep working.)
  Money is never negative, and a charge's `amount` is above zero: `"-30.00"` or a charge of `"0.00"`
  is bad input, dead-lettered with its reason. A price may be `"0.00"` (a free plan or a trial).
  Refunds round half to even to two places.
- **Dates** are `YYYY-MM-DD`, in UTC. Period ends (`current_period_end`, `period_end`) are exclusive.
- **Timestamps** are RFC 3339 with an offset, written in UTC (`2026-11-21T09:30:00Z`).
- **Bad input** (CONTRACT.md section 7): a record that is not JSON, not an envelope, of an unknown
  `event_type` or `schema_version`, missing required fields, with wrong types, or larger than 1 MiB
  never stops a consumer. It goes to `cancellations.dlq` as a `RecordDeadLettered` event with the
  original bytes (or their digest when too large), the topic/partition/offset and a readable reason;
  when a `request_id` can be read, a `rejected` status is published for it.
"""


def render_readme() -> str:
    grouped = _events_by_topic()
    lines = [_HEAD, "## Topics", ""]
    lines += [
        "| topic | partitions | record key | written by | read by | visibility | configs |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in TOPICS:
        visibility = "public (contract)" if t.public else "internal"
        lines.append(
            f"| [`{t.name}`](#{t.name.replace('.', '')}) | {_partitions(t)} | {_cell(t.key)} | "
            f"{_cell(t.written_by)} | {_cell(t.read_by)} | {visibility} | {_configs(t)} |"
        )
    for t in TOPICS:
        lines += ["", f"### `{t.name}`", ""]
        lines.append(
            f"{'Public' if t.public else 'Internal'} topic, {_partitions(t)} partition(s), keyed by "
            f"{t.key}; configs: {_configs(t)}. Written by {t.written_by}; read by {t.read_by}."
        )
        lines.append("")
        if not grouped[t.name]:
            lines.append("No event types yet.")
            continue
        lines += ["| event | version | record key | schema | description |", "|---|---|---|---|---|"]
        for cls in grouped[t.name]:
            lines.append(
                f"| `{cls.event_type}` | {cls.schema_version} | {_cell(record_key(cls))} | "
                f"[{file_name(cls)}]({file_name(cls)}) | {_cell(one_line(cls))} |"
            )
    return "\n".join(lines) + "\n"


# --- generate, compare, write ------------------------------------------------------------------


def render_all() -> dict[str, str]:
    """File name -> exact content of every file schemas/ should hold."""
    files = {file_name(cls): dump(record_schema(cls)) for cls in REGISTRY.values()}
    files[README] = render_readme()
    return dict(sorted(files.items()))


def compare(out_dir: Path = SCHEMAS_DIR) -> list[str]:
    """What differs between `out_dir` and what the models give: `stale: X`, `missing: X`, `extra: X`."""
    expected = render_all()
    present = {p.name for p in out_dir.iterdir() if p.is_file()} if out_dir.is_dir() else set()
    problems = []
    for name, content in expected.items():
        if name not in present:
            problems.append(f"missing: {name}")
        elif (out_dir / name).read_text(encoding="utf-8") != content:
            problems.append(f"stale: {name}")
    problems += [f"extra: {name}" for name in sorted(present - expected.keys())]
    return problems


def write(out_dir: Path = SCHEMAS_DIR) -> list[str]:
    """Bring `out_dir` in line with the models; returns what changed (same words as `compare`)."""
    changes = compare(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in render_all().items():
        (out_dir / name).write_text(content, encoding="utf-8", newline="\n")
    for change in changes:
        kind, name = change.split(": ", 1)
        if kind == "extra":
            (out_dir / name).unlink()
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when schemas/ is out of date")
    parser.add_argument("--out", type=Path, default=SCHEMAS_DIR, help="output folder (default: schemas/)")
    args = parser.parse_args(argv)
    if args.check:
        problems = compare(args.out)
        for problem in problems:
            print(problem)
        if problems:
            print(f"{args.out} is out of date: run `python scripts/gen_schemas.py`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(render_all())} files)")
        return 0
    changes = write(args.out)
    for change in changes:
        print(change.replace("stale:", "updated:").replace("missing:", "created:").replace("extra:", "removed:"))
    print(f"{args.out}: {len(render_all())} files, {len(changes)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
