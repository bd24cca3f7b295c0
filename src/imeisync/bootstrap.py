"""The composition root: builds the database, keys and services from the configuration.

Entry points (CLI, HTTP apps, daemon, its jobs) ask this module for what they need and nothing
else constructs services, so every part of the program is wired the same way. What a test may
want to replace is a parameter of ``App``: the clock every service reads, and the factory of
registry clients (``App(config, clock=..., registry_client_factory=...)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from imeisync.adapters.data_crypto import DataCipher
from imeisync.adapters.police_jws import TrustedKeys
from imeisync.adapters.rate_limit import RateLimiter
from imeisync.config import Config
from imeisync.domain.errors import BadInput, ImeisyncError
from imeisync.services.orders import OrderIntake
from imeisync.store.db import Database
from imeisync.store.schema import ensure_schema

K = TypeVar("K")

if TYPE_CHECKING:
    from imeisync.adapters.attach_index import IndexKeeper
    from imeisync.adapters.registry_client import RegistryClient
    from imeisync.adapters.tokens import TokenStore
    from imeisync.services.audit import Verification
    from imeisync.services.disputes import Disputes
    from imeisync.services.liaison import LiaisonDesk
    from imeisync.services.notices import Notices
    from imeisync.services.operations import OpsReader
    from imeisync.services.retention import PurgeResult
    from imeisync.services.sighting_alerts import AlertSender
    from imeisync.services.sighting_cases import SightingCases
    from imeisync.services.sync import SyncService


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class App:
    config: Config
    _db: Database | None = field(default=None, repr=False)
    clock: Callable[[], datetime] = field(default=_now, kw_only=True, repr=False)
    # Builds a registry client from ``RegistryClient``'s options; default: from [registry].
    registry_client_factory: Callable[..., RegistryClient] | None = field(
        default=None, kw_only=True, repr=False)

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
        directory = Path(self.config.police.trusted_keys)
        if not directory.is_dir():
            raise BadInput(
                f"trusted police keys folder {directory} does not exist",
                "create it and put each police authority's public key in it as <kid>.pub "
                "([police] trusted_keys)",
            )
        return TrustedKeys.load(directory)

    @functools.cached_property
    def cipher(self) -> DataCipher:
        return DataCipher.from_key_file(Path(self.config.security.data_key_file))

    def intake(self) -> OrderIntake:
        return OrderIntake(
            self.db,
            operator_id=self.config.operator_id,
            operator_country=self.config.operator.country,
            trusted_keys=lambda: self.trusted_keys,
            cipher=lambda: self.cipher,
            allow_unsigned_blocks=self.config.police.allow_unsigned_blocks,
            max_order_age=timedelta(seconds=self.config.police.max_order_age),
            max_range=self.config.police.max_range,
            clock=self.clock,
        )

    def registry_client(self, **options: Any) -> RegistryClient:
        """A client for the central registry, signing with ``[registry] signing_key``;
        ``options`` go to ``RegistryClient`` (the daemon's last push: no retries, short
        timeouts)."""
        from imeisync.adapters.keys import load_private_key, load_public_key
        from imeisync.adapters.registry_client import RegistryClient

        if self.registry_client_factory is not None:
            return self.registry_client_factory(**options)
        section = self.config.registry
        signing_key = _registry_key("signing_key", section.signing_key, load_private_key)
        registry_key = _registry_key("registry_public_key", section.registry_public_key,
                                     load_public_key)
        return RegistryClient(section.url, signing_key=signing_key,
                              kid=section.kid, registry_key=registry_key, **options)


    def notices(self) -> Notices:
        """Lift notices: issued for our lifts during a registry outage, applied from others."""
        from imeisync.adapters.keys import load_private_key, load_public_key
        from imeisync.services.notices import Notices

        section = self.config.registry
        return Notices(
            self.db, operator_id=self.operator_id,
            operator_country=self.config.operator.country,
            signing_key=lambda: _registry_key("signing_key", section.signing_key,
                                              load_private_key),
            registry_key=lambda: _registry_key("registry_public_key",
                                               section.registry_public_key, load_public_key),
            outage_after=self.config.sync.outage_after, clock=self.clock)

    def sync(self, client_options: dict[str, Any] | None = None) -> SyncService:
        from imeisync.services.sync import SyncService

        client = (functools.partial(self.registry_client, **client_options) if client_options
                  else self.registry_client)
        return SyncService(self.db, client, operator_id=self.operator_id,
                           operator_country=self.config.operator.country,
                           max_shrink=self.config.sync.max_shrink,
                           receipt_deadline=self.config.sync.receipt_deadline,
                           clock=self.clock,
                           alerts=bool(self.config.sightings.webhook_url))

    def disputes(self) -> Disputes:
        from imeisync.services.disputes import Disputes

        return Disputes(self.db, self.registry_client, operator_id=self.operator_id,
                        operator_country=self.config.operator.country, clock=self.clock)

    @functools.cached_property
    def tokens(self) -> TokenStore:
        """API tokens (``[api] tokens_file``); followed for changes, ``reload()`` on SIGHUP."""
        from imeisync.adapters.tokens import TokenStore

        return TokenStore(Path(self.config.api.tokens_file))

    def desk(self) -> LiaisonDesk:
        """What the police API and the web console do for a token holder."""
        from imeisync.services.liaison import LiaisonDesk

        return LiaisonDesk(
            self.db, operator_id=self.operator_id,
            operator_country=self.config.operator.country, intake=self.intake,
            disputes=self.disputes, cipher=lambda: self.cipher,
            trusted_keys=lambda: self.trusted_keys,
            unknown_status=self.config.eir.unknown_status,
            push_every=self.config.sync.push_interval,
            pull_every=self.config.sync.pull_interval,
            foreign_lookups=self.foreign_lookups)

    @functools.cached_property
    def foreign_lookups(self) -> RateLimiter:
        """Per person, the device look-ups that show other operators' records
        (``[api] foreign_lookup_rate``): no bulk export of foreign records one at a time."""
        return RateLimiter.parse(self.config.api.foreign_lookup_rate)

    def sighting_cases(self) -> SightingCases:
        """Sightings of our cases for liaison staff and auditors; disclosure on a court order."""
        from imeisync.services.sighting_cases import SightingCases

        return SightingCases(self.desk(), cipher=lambda: self.cipher)

    def alert_sender(self) -> AlertSender | None:
        """Delivers sighting alerts to ``[sightings] webhook_url`` (None when not set)."""
        from imeisync.adapters.keys import load_private_key
        from imeisync.services.sighting_alerts import AlertSender

        section = self.config.sightings
        if not section.webhook_url:
            return None
        return AlertSender(self.db, section.webhook_url,
                           lambda: load_private_key(Path(section.webhook_key)),
                           kid=self.operator_id, clock=self.clock)

    def purge_retention(self) -> PurgeResult:
        """Remove notes and dispute texts of cases closed over ``retention_days`` ago, and
        other operators' records closed over ``foreign_retention_days`` ago."""
        from imeisync.services.retention import purge

        security = self.config.security
        return purge(self.db, security.retention_days,
                     foreign_days=security.foreign_retention_days,
                     me=self.operator_id)

    def purge_sightings(self) -> tuple[int, str]:
        """Delete sightings seen over ``[sightings] retention_days`` ago: (how many, cut-off)."""
        from imeisync.services.sightings import purge_sightings

        return purge_sightings(self.db, self.config.sightings.retention_days)

    def verify_audit(self) -> Verification:
        """Check the audit trail's hash chain (``imeisync audit verify``, the daily job)."""
        from imeisync.services import audit

        with self.db.read() as session:
            return audit.verify(session)

    def ops_reader(self) -> OpsReader:
        """The operations figures the daemon serves (``/healthz``, ``/metrics``)."""
        from imeisync.services.operations import OpsReader

        return OpsReader(self.db)

    def upgrade_schema(self) -> tuple[str | None, str]:
        """Apply the store's migrations (``imeisync db upgrade``); (before, after) revisions."""
        from imeisync.store.schema import upgrade

        return upgrade_schema(self.config.database_url, upgrade)

    def reload(self) -> dict[str, Any]:
        """Re-read what may change while the daemon runs (SIGHUP): the trusted police keys and
        the API tokens. Each is replaced whole or not at all; an error keeps the old set in force
        and is raised after the other was reloaded."""
        done: dict[str, Any] = {}
        errors: list[ImeisyncError] = []
        if "trusted_keys" in self.__dict__:
            try:
                self.trusted_keys.reload()
                done["police_keys"] = self.trusted_keys.kids
            except ImeisyncError as exc:
                errors.append(exc)
        if "tokens" in self.__dict__:
            try:
                self.__dict__["tokens"].reload()
                done["tokens"] = True
            except ImeisyncError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
        return done

    def close(self) -> None:
        if self._db is not None:
            self._db.dispose()


def upgrade_schema(database_url: str, upgrade: Callable[[Database], tuple[str | None, str]],
                   ) -> tuple[str | None, str]:
    """Run ``upgrade`` (the store's or the registry's migrations) on a database of its own,
    not ``App.db``, which would create a missing schema instead of upgrading it."""
    database = Database(database_url)
    try:
        return upgrade(database)
    finally:
        database.dispose()


def index_keeper(config: Config) -> IndexKeeper:
    """One process's attach index (``[eir] index_file``), not yet started."""
    from imeisync.adapters.attach_index import IndexKeeper

    return IndexKeeper(config.database_url, config.eir.index_file or None,
                       unknown_tac=config.eir.unknown_tac)


def _registry_key(name: str, path: str, loader: Callable[[Path], K]) -> K:
    """A key file of ``[registry]``, its error naming the key."""
    try:
        return loader(Path(path))
    except ImeisyncError as exc:
        raise BadInput(f"[registry] {name}: {exc}", code=exc.code) from None
