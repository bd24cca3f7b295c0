"""registry: IMEI ranges (a record and its feed entries name a last key)

Revision ID: r0003_ranges
Revises: r0001
Create Date: 2026-12-01 02:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "r0003_ranges"
# To be re-chained onto "r0002_acks" when the receipts migration is merged.
down_revision = "r0002_acks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("registry_records", "registry_feed"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("imei_key_last", sa.String(length=14), nullable=True))


def downgrade() -> None:
    for table in ("registry_feed", "registry_records"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("imei_key_last")
