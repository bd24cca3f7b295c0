"""Initial schema: records with history, orders, outbox, change sequence, audit chain.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 12:17:47.223187
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=True),
        sa.Column("case_ref", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "change_log",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("subject", sa.String(length=12), nullable=False),
        sa.Column("op", sa.String(length=8), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "exceptions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("imsi", sa.String(length=15), nullable=False),
        sa.Column("case_ref", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("removed_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.create_index(
            "uq_exceptions_active",
            ["imei_key", "imsi"],
            unique=True,
            sqlite_where=sa.text("removed_at IS NULL"),
            postgresql_where=sa.text("removed_at IS NULL"),
        )

    op.create_table(
        "records",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("owner_id", sa.String(length=64), nullable=False),
        sa.Column("owner_country", sa.String(length=2), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("case_ref", sa.String(length=64), nullable=True),
        sa.Column("police_unit", sa.String(length=128), nullable=True),
        sa.Column("note_enc", sa.Text(), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_by", sa.String(length=128), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(length=128), nullable=True),
        sa.Column("close_reason", sa.String(length=32), nullable=True),
        sa.Column("registry_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.create_index("ix_records_key", ["imei_key"], unique=False)
        batch_op.create_index(
            "uq_records_open_owner",
            ["imei_key", "owner_id"],
            unique=True,
            sqlite_where=sa.text("closed_at IS NULL"),
            postgresql_where=sa.text("closed_at IS NULL"),
        )

    op.create_table(
        "sync_state",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "orders",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("order_id", sa.String(length=128), nullable=True),
        sa.Column("kind", sa.String(length=8), nullable=True),
        sa.Column("imei", sa.String(length=15), nullable=True),
        sa.Column("imei_key", sa.String(length=14), nullable=True),
        sa.Column("case_ref", sa.String(length=64), nullable=True),
        sa.Column("police_unit", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_by", sa.String(length=128), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("signed_kid", sa.String(length=64), nullable=True),
        sa.Column("outcome", sa.String(length=12), nullable=False),
        sa.Column("refusal_code", sa.String(length=40), nullable=True),
        sa.Column("refusal_message", sa.Text(), nullable=True),
        sa.Column("record_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.ForeignKeyConstraint(
            ["record_id"],
            ["records.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.create_index("ix_orders_imei_key", ["imei_key"], unique=False)
        batch_op.create_index(
            "uq_orders_order_id_taken",
            ["order_id"],
            unique=True,
            sqlite_where=sa.text("outcome <> 'refused'"),
            postgresql_where=sa.text("outcome <> 'refused'"),
        )

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("change_id", sa.String(length=80), nullable=False),
        sa.Column("order_id", sa.String(length=128), nullable=False),
        sa.Column(
            "record_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("action", sa.String(length=8), nullable=False),
        sa.Column("imei_key", sa.String(length=14), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("result_code", sa.String(length=8), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["record_id"],
            ["records.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("change_id"),
    )
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_state", ["state", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_state")

    op.drop_table("outbox")
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_orders_order_id_taken",
            sqlite_where=sa.text("outcome <> 'refused'"),
            postgresql_where=sa.text("outcome <> 'refused'"),
        )
        batch_op.drop_index("ix_orders_imei_key")

    op.drop_table("orders")
    op.drop_table("sync_state")
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_records_open_owner",
            sqlite_where=sa.text("closed_at IS NULL"),
            postgresql_where=sa.text("closed_at IS NULL"),
        )
        batch_op.drop_index("ix_records_key")

    op.drop_table("records")
    with op.batch_alter_table("exceptions", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_exceptions_active",
            sqlite_where=sa.text("removed_at IS NULL"),
            postgresql_where=sa.text("removed_at IS NULL"),
        )

    op.drop_table("exceptions")
    op.drop_table("change_log")
    op.drop_table("audit_head")
    op.drop_table("audit_events")
