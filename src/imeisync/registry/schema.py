"""The registry database's schema, upgraded with its own Alembic scripts.

Same policy as the daemon's store (``imeisync.store.schema.Migrations``): an empty database is
created at the current revision when the registry starts; an older one needs an explicit
``imeisync registry upgrade --config REGISTRY.toml``. The version table is
``registry_alembic_version``, so pointing the registry at an operator's database (or the
reverse) is refused instead of mixing the two.
"""

from __future__ import annotations

from pathlib import Path

from imeisync.store.schema import Migrations

REGISTRY = Migrations(
    location=Path(__file__).parent / "migrations",
    version_table="registry_alembic_version",
    what="registry",
    url_key="[server] database_url",
    upgrade_command="imeisync registry upgrade --config REGISTRY.toml",
)
head_revision = REGISTRY.head_revision
current_revision = REGISTRY.current_revision
upgrade = REGISTRY.upgrade
ensure_schema = REGISTRY.ensure_schema
