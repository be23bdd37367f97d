"""email delivery states: the context of emails awaiting the customer's contact, and when the last
send started (status `sending`)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.add_column('emails', sa.Column('context', sa.JSON(), nullable=True))
    op.add_column('emails', sa.Column('attempted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('emails', 'attempted_at')
    op.drop_column('emails', 'context')
