"""The composition root: builds the database, keys and services from the configuration.

Entry points (CLI, HTTP apps, daemon) ask this module for what they need and nothing else
constructs services, so every part of the program is wired the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from imeisync.adapters.data_crypto import DataCipher
from imeisync.adapters.police_jws import TrustedKeys
from imeisync.config import Config
from imeisync.domain.errors import BadInput
from imeisync.services.orders import OrderIntake
from imeisync.store.db import Database
from imeisync.store.schema import ensure_schema


@dataclass
class App:
    config: Config
    _db: Database | None = field(default=None, repr=False)

    @property
    def operator_id(self) -> str:
        return self.config.operator_id

    @property
    def db(self) -> Database:
        """The store, its schema created if the database is empty."""
        if self._db is None:
            db = Database(self.config.database_url)
            ensure_schema(db)
            self._db = db
        return self._db

    @functools.cached_property
    def trusted_keys(self) -> TrustedKeys:
        directory = self.config.path("police", "trusted_keys")
        if not directory.is_dir():
            raise BadInput(
                f"trusted police keys folder {directory} does not exist",
                "create it and put each police authority's public key in it as <kid>.pub "
                "([police] trusted_keys)",
            )
        return TrustedKeys.load(directory)

    @functools.cached_property
    def cipher(self) -> DataCipher:
        return DataCipher.from_key_file(Path(self.config.get("security", "data_key_file")))

    def intake(self) -> OrderIntake:
        return OrderIntake(
            self.db,
            operator_id=self.config.operator_id,
            operator_country=self.config.operator_country,
            trusted_keys=lambda: self.trusted_keys,
            cipher=lambda: self.cipher,
            allow_unsigned_blocks=self.config.get("police", "allow_unsigned_blocks"),
            max_order_age=timedelta(seconds=self.config.get("police", "max_order_age")),
        )

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()
