"""How long emails waited in notification's outbox of emails, from its own `emails` table: the median from
written to claimed (`created_at` -> `attempted_at`) and from claimed to sent (`attempted_at` -> `sent_at`),
over the whole run and over its first and last tenth (by `created_at`).

    .venv/bin/python scripts/email_waits.py var/bench-<time>/notification.db   # the run dir `cancelflow bench` made
    .venv/bin/python scripts/email_waits.py postgresql+asyncpg://... # a PostgreSQL store
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from datetime import datetime

from sqlalchemy import select

from cancelflow.db import make_engine
from notification.orm import emails


def _ms(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds() * 1000


def medians(rows: list[tuple[datetime, datetime, datetime]]) -> tuple[float, float]:
    return (statistics.median(_ms(created, claimed) for created, claimed, _ in rows),
            statistics.median(_ms(claimed, sent) for _, claimed, sent in rows))


async def main(where: str) -> None:
    url = where if "://" in where else f"sqlite+aiosqlite:///{where}"
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            rows = [tuple(r) for r in await conn.execute(
                select(emails.c.created_at, emails.c.attempted_at, emails.c.sent_at)
                .where(emails.c.status == "sent").order_by(emails.c.created_at))]
    finally:
        await engine.dispose()
    tenth = max(1, len(rows) // 10)
    for label, part in (("all", rows), ("first tenth", rows[:tenth]), ("last tenth", rows[-tenth:])):
        claimed, sent = medians(part)  # type: ignore[arg-type]
        print(f"{label:12} {len(part):6} emails: median {claimed:.0f} ms written to claimed, {sent:.0f} ms claimed to sent")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
