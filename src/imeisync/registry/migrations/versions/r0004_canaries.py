"""registry canaries: synthetic records planted per member (leak tracing)

Revision ID: r0004_canaries
Revises: r0003_ranges
Create Date: 2026-12-01 04:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "r0004_canaries"
down_revision = "r0003_ranges"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_canaries",
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("recipient_id", sa.String(length=64), nullable=False),
        sa.Column("draw", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("owner_country", sa.String(length=2), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("at", sa.String(length=32), nullable=False),
        sa.Column("change_id", sa.String(length=80), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("planted_at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("imei_key"),
        sa.UniqueConstraint("change_id"),
    )
    with op.batch_alter_table("registry_canaries", schema=None) as batch_op:
        batch_op.create_index("ix_registry_canaries_recipient", ["recipient_id", "draw"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("registry_canaries", schema=None) as batch_op:
        batch_op.drop_index("ix_registry_canaries_recipient")
    op.drop_table("registry_canaries")
