"""Disputes: filed by us about another operator's record, or received about ours.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 13:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "disputes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("dispute_id", sa.String(length=80), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("filer_id", sa.String(length=64), nullable=False),
        sa.Column("filer_country", sa.String(length=2), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("owner_country", sa.String(length=2), nullable=False),
        sa.Column("case_ref", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("filed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("filed_by", sa.String(length=128), nullable=True),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("answer_reason", sa.Text(), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_by", sa.String(length=128), nullable=True),
        sa.Column("registry_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("dispute_id"),
    )
    with op.batch_alter_table("disputes", schema=None) as batch_op:
        batch_op.create_index("ix_disputes_state", ["direction", "state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("disputes", schema=None) as batch_op:
        batch_op.drop_index("ix_disputes_state")
    op.drop_table("disputes")
