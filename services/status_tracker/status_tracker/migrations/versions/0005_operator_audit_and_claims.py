"""operator audit trail and claims (CONTRACT.md section 11)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 21:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        'operator_audit',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('operator', sa.String(length=100), nullable=False),
        sa.Column('role', sa.String(length=20), nullable=False),
        sa.Column('action', sa.String(length=30), nullable=False),
        sa.Column('request_id', sa.String(length=64), nullable=True),
        sa.Column('new_request_id', sa.String(length=64), nullable=True),
        sa.Column('status', sa.Integer(), nullable=False),
        sa.Column('outcome', sa.Text(), nullable=False),
        sa.Column('note', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f('ix_operator_audit_at'), 'operator_audit', ['at'], unique=False)
    op.create_index(op.f('ix_operator_audit_request_id'), 'operator_audit', ['request_id'], unique=False)
    op.create_table(
        'operator_claims',
        sa.Column('request_id', sa.String(length=64), nullable=False),
        sa.Column('phase', sa.String(length=20), nullable=False),
        sa.Column('action', sa.String(length=30), nullable=False),
        sa.Column('operator', sa.String(length=100), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('request_id', 'phase'),
    )


def downgrade() -> None:
    op.drop_table('operator_claims')
    op.drop_index(op.f('ix_operator_audit_request_id'), table_name='operator_audit')
    op.drop_index(op.f('ix_operator_audit_at'), table_name='operator_audit')
    op.drop_table('operator_audit')
