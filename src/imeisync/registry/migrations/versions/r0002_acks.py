"""registry apply acknowledgements: each member's applied position and its steps

Revision ID: r0002_acks
Revises: r0001
Create Date: 2026-12-01 02:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "r0002_acks"
down_revision = "r0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_acks",
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("applied_through", sa.BigInteger(), nullable=False),
        sa.Column("acked_at", sa.String(length=32), nullable=False),
        sa.Column("moved_at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("member_id"),
    )
    op.create_table(
        "registry_ack_steps",
        sa.Column("member_id", sa.String(length=64), nullable=False),
        sa.Column("applied_through", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("member_id", "applied_through"),
    )
    # A receipt asked for another member's change is refused (403) without a scan.
    with op.batch_alter_table("registry_submissions", schema=None) as batch_op:
        batch_op.create_index("ix_registry_submissions_change", ["change_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("registry_submissions", schema=None) as batch_op:
        batch_op.drop_index("ix_registry_submissions_change")
    op.drop_table("registry_ack_steps")
    op.drop_table("registry_acks")
