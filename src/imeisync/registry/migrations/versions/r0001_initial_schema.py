"""registry initial schema: feed, records, submissions, disputes

Revision ID: r0001
Revises:
Create Date: 2026-11-21 12:24:16.292035
"""

import sqlalchemy as sa
from alembic import op

revision = "r0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "registry_disputes",
        sa.Column("dispute_id", sa.String(length=80), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("filer_id", sa.String(length=64), nullable=False),
        sa.Column("filer_country", sa.String(length=2), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("owner_country", sa.String(length=2), nullable=False),
        sa.Column("case_ref", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("filed_at", sa.String(length=32), nullable=False),
        sa.Column("filed_seq", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("answer_reason", sa.Text(), nullable=True),
        sa.Column("answered_at", sa.String(length=32), nullable=True),
        sa.Column("answer_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("dispute_id"),
    )
    with op.batch_alter_table("registry_disputes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_registry_disputes_record", ["imei_key", "owner_id", "state"], unique=False
        )

    op.create_table(
        "registry_feed",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("owner_country", sa.String(length=2), nullable=False),
        sa.Column("change_id", sa.String(length=80), nullable=True),
        sa.Column("action", sa.String(length=8), nullable=True),
        sa.Column("kind", sa.String(length=8), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("at", sa.String(length=32), nullable=False),
        sa.Column("received_at", sa.String(length=32), nullable=False),
        sa.Column("audience", sa.String(length=64), nullable=True),
        sa.Column("dispute_id", sa.String(length=80), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "registry_records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("owner_country", sa.String(length=2), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("opened_seq", sa.BigInteger(), nullable=False),
        sa.Column("opened_at", sa.String(length=32), nullable=False),
        sa.Column("opened_change_id", sa.String(length=80), nullable=False),
        sa.Column("closed_seq", sa.BigInteger(), nullable=True),
        sa.Column("closed_at", sa.String(length=32), nullable=True),
        sa.Column("closed_change_id", sa.String(length=80), nullable=True),
        sa.Column("close_reason", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("registry_records", schema=None) as batch_op:
        batch_op.create_index("ix_registry_records_key", ["imei_key"], unique=False)
        batch_op.create_index(
            "uq_registry_records_open",
            ["imei_key", "owner_id"],
            unique=True,
            sqlite_where=sa.text("closed_seq IS NULL"),
            postgresql_where=sa.text("closed_seq IS NULL"),
        )

    op.create_table(
        "registry_submissions",
        sa.Column("operator_id", sa.String(length=64), nullable=False),
        sa.Column("change_id", sa.String(length=80), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("result", sa.String(length=12), nullable=False),
        sa.Column("code", sa.String(length=8), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("received_at", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("operator_id", "change_id"),
    )


def downgrade() -> None:

    op.drop_table("registry_submissions")
    with op.batch_alter_table("registry_records", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_registry_records_open",
            sqlite_where=sa.text("closed_seq IS NULL"),
            postgresql_where=sa.text("closed_seq IS NULL"),
        )
        batch_op.drop_index("ix_registry_records_key")

    op.drop_table("registry_records")
    op.drop_table("registry_feed")
    with op.batch_alter_table("registry_disputes", schema=None) as batch_op:
        batch_op.drop_index("ix_registry_disputes_record")

    op.drop_table("registry_disputes")
