"""registry sightings: notices between members, and the feed's sighting entries

Revision ID: r0005_sightings
Revises: r0004_canaries
Create Date: 2026-12-01 04:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "r0005_sightings"
down_revision = "r0004_canaries"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_sightings",
        sa.Column("reporter_id", sa.String(length=64), nullable=False),
        sa.Column("notice_id", sa.String(length=80), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=True),
        sa.Column("seen_at", sa.String(length=32), nullable=True),
        sa.Column("result", sa.String(length=12), nullable=False),
        sa.Column("code", sa.String(length=8), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("owners", sa.Text(), nullable=True),
        sa.Column("received_at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("reporter_id", "notice_id"),
    )
    with op.batch_alter_table("registry_feed", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reporter_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("reporter_country", sa.String(length=2), nullable=True))
        batch_op.add_column(sa.Column("notice_id", sa.String(length=80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("registry_feed", schema=None) as batch_op:
        batch_op.drop_column("notice_id")
        batch_op.drop_column("reporter_country")
        batch_op.drop_column("reporter_id")
    op.drop_table("registry_sightings")
