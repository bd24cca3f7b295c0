"""Reading a verified snapshot spool: every line checked, in strictly increasing (imei, owner)
order, as named rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from imeisync.adapters.registry_client import RegistryAnswerRejected
from imeisync.domain.fields import COUNTRY, OPENING_REASONS, OPERATOR_ID
from imeisync.domain.imei import is_key
from imeisync.store.bulk import REGISTRY_TIME

_new = tuple.__new__
_VALID_KIND_REASON = frozenset((k, r) for k in ("block", "track") for r in OPENING_REASONS)


class SnapshotRow(NamedTuple):
    """One snapshot line (``SNAPSHOT_HEADER``: imei,owner,country,kind,reason,seq,at,imei_last;
    ``imei_last`` empty for a single device, the range's last key for a range)."""

    imei_key: str
    owner_id: str
    owner_country: str
    kind: str
    reason: str
    seq: int
    at: str  # in the registry's form (``REGISTRY_TIME``)
    imei_key_last: str | None


def snapshot_rows(path: Path) -> Iterator[SnapshotRow]:
    """The verified spool's records, each checked, in strictly increasing (imei, owner) order.

    Raises ``RegistryAnswerRejected`` naming the line; the caller's transaction rolls back.
    (The file is read as ASCII with replacement, so a non-ASCII byte never passes a check.)
    """
    owners: set[str] = set()
    countries: set[str] = set()
    at_match = REGISTRY_TIME.fullmatch
    valid = _VALID_KIND_REASON
    last_key, last_owner = "", ""
    with open(path, encoding="ascii", errors="replace") as lines:
        next(lines)  # the column line, checked while downloading
        for number, line in enumerate(lines, start=2):
            try:
                key, owner, country, kind, reason, seq, at, last = line[:-1].split(",")
            except ValueError:
                raise RegistryAnswerRejected(
                    f"snapshot line {number} does not have 8 fields") from None
            if not is_key(key):
                raise RegistryAnswerRejected(f"snapshot line {number}: {key[:20]!r} is not a "
                                             "14-digit IMEI key")
            if owner not in owners:  # few owners and countries: each is checked once
                if not OPERATOR_ID.fullmatch(owner):
                    raise RegistryAnswerRejected(f"snapshot line {number}: owner "
                                                 f"{owner[:30]!r} is not an operator id")
                owners.add(owner)
            if country not in countries:
                if not COUNTRY.fullmatch(country):
                    raise RegistryAnswerRejected(f"snapshot line {number}: {country[:8]!r} "
                                                 "is not a country code")
                countries.add(country)
            if (kind, reason) not in valid:
                raise RegistryAnswerRejected(f"snapshot line {number}: kind/reason "
                                             f"{kind[:10]!r}/{reason[:20]!r} is not known")
            if not seq.isdigit() or at_match(at) is None:
                raise RegistryAnswerRejected(f"snapshot line {number}: bad seq or time")
            if key < last_key or (key == last_key and owner <= last_owner):
                raise RegistryAnswerRejected(f"snapshot line {number} is out of order or "
                                             "repeated")
            if last and not (is_key(last) and last[:8] == key[:8] and last >= key):
                raise RegistryAnswerRejected(f"snapshot line {number}: {last[:20]!r} is not "
                                             "the last key of a range of its first's TAC")
            last_key, last_owner = key, owner
            # tuple.__new__: the same SnapshotRow at a third of its constructor's cost.
            yield _new(SnapshotRow, (key, owner, country, kind, reason, int(seq), at,
                                     last or None))
