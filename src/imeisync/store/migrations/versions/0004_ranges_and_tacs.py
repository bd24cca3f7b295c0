"""IMEI ranges (a record, its change, its outbox row and its order name a last key) and the
TAC table (device names; unknown TACs caught at entry and, by policy, at the attach check).

Revision ID: 0004_ranges_and_tacs
Revises: 0002
Create Date: 2026-12-01 02:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_ranges_and_tacs"
# To be re-chained onto "0003_receipts" when the receipts migration is merged.
down_revision = "0003_receipts"
branch_labels = None
depends_on = None

_RANGED = ("records", "change_log", "outbox", "orders")


def upgrade() -> None:
    for table in _RANGED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("imei_key_last", sa.String(length=14), nullable=True))
    op.create_table(
        "tacs",
        sa.Column("tac", sa.String(length=8), nullable=False),
        sa.Column("brand", sa.Text(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("extra", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("tac"),
    )


def downgrade() -> None:
    op.drop_table("tacs")
    for table in reversed(_RANGED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("imei_key_last")
