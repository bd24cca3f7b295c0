"""Sightings of tracked devices (IMSI encrypted), their court-ordered disclosures, the trace
alerts' outbox and the notices exchanged with other operators through the registry.

Revision ID: 0005_sightings
Revises: 0004_ranges_and_tacs
Create Date: 2026-12-01 04:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_sightings"
down_revision = "0004_ranges_and_tacs"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sightings",
        sa.Column("id", _ID, nullable=False),
        sa.Column("sighting_id", sa.String(length=40), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("interface", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("svn", sa.String(length=2), nullable=True),
        sa.Column("node", sa.String(length=255), nullable=True),
        sa.Column("imsi_state", sa.String(length=10), nullable=False),
        sa.Column("imsi_enc", sa.Text(), nullable=True),
        sa.Column("imsi_digest", sa.String(length=64), nullable=True),
        sa.Column("record_id", _ID, nullable=False),
        sa.Column("case_ref", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(["record_id"], ["records.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sighting_id"),
    )
    op.create_index("ix_sightings_key_seen", "sightings", ["imei_key", "seen_at"])
    op.create_index("ix_sightings_seen", "sightings", ["seen_at"])
    op.create_table(
        "sighting_disclosures",
        sa.Column("id", _ID, nullable=False),
        sa.Column("sighting_id", sa.String(length=40), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("case_ref", sa.String(length=64), nullable=True),
        sa.Column("court_order", sa.String(length=128), nullable=False),
        sa.Column("court", sa.String(length=128), nullable=False),
        sa.Column("disclosed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disclosed_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_sighting_disclosures_sighting", "sighting_disclosures", ["sighting_id"])
    op.create_table(
        "sighting_alerts",
        sa.Column("id", _ID, nullable=False),
        sa.Column("sighting_id", sa.String(length=80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sighting_id"),
    )
    op.create_index("ix_sighting_alerts_due", "sighting_alerts", ["state", "next_attempt_at"])
    op.create_table(
        "sighting_notices",
        sa.Column("id", _ID, nullable=False),
        sa.Column("notice_id", sa.String(length=80), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("reporter_id", sa.String(length=64), nullable=False),
        sa.Column("reporter_country", sa.String(length=2), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("registry_seq", sa.BigInteger(), nullable=True),
        sa.Column("record_id", _ID, nullable=True),
        sa.ForeignKeyConstraint(["record_id"], ["records.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("notice_id"),
    )
    op.create_index("ix_sighting_notices_state", "sighting_notices", ["direction", "state"])


def downgrade() -> None:
    for table in ("sighting_notices", "sighting_alerts", "sighting_disclosures", "sightings"):
        op.drop_table(table)
