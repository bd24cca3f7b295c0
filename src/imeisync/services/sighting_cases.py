"""Sightings for the police case: what liaison staff and auditors see, and lawful disclosure.

A sighting (``services/sightings.py`` records them) is personal data under a police case, so:

- **our records only** — only sightings whose record this operator owns are listed or
  disclosed; other operators learn of their devices through a minimal notice (``received``
  notices are shown here as "seen on a network of op-dk (DK)");
- **never the IMSI** in a list or a view: time, interface, node, software version, case,
  status and whether the network sent a subscriber identity (``imsi_state``);
- **disclosure** — the IMSI is decrypted only for a ``liaison`` token on a court order
  (reference and court), for a sighting of one of our cases; the ``SightingDisclosure`` row and
  a ``sighting.disclosed`` audit event (no IMSI) are written in one transaction, and only then
  is the IMSI returned, once, to that person. Seeing it again needs a new recorded disclosure;
- **refusals** (no court order, a role that may not disclose, another operator's case, an
  unknown or purged sighting, no usable IMSI) write a ``sighting.disclosure`` audit event with
  outcome ``refused`` and nothing else;
- every read appends ``case.read`` (``LiaisonDesk.audit_read``), as for the other case data.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from imeisync.domain.errors import BadInput, ImeisyncError, NotAllowed, NotFound, Refused
from imeisync.domain.imei import Imei, parse_lookup
from imeisync.domain.imei import format as format_imei
from imeisync.domain.roles import Permission, allowed
from imeisync.domain.times import rfc3339
from imeisync.services import audit
from imeisync.services.liaison import Caller, LiaisonDesk
from imeisync.services.sightings import imsi_context
from imeisync.store.models import (
    Record,
    Sighting,
    SightingAlert,
    SightingDisclosure,
    SightingNotice,
)

NEW_DAYS = 7  # "new" sightings (the start page's badge): seen in the last 7 days
MAX_TEXT = 128  # court order reference and court name (the columns' width)
MAX_ID = 40  # a sighting id (uuid4 hex is 32)


def _court_text(value: Any, name: str, what: str) -> str:
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise BadInput(f"a disclosure needs the {what}",
                       "give the court order's reference and the issuing court exactly as on "
                       "the order; without a court order the subscriber is not disclosed",
                       code="no_court_order", field=name)
    if len(text) > MAX_TEXT or not text.isprintable():
        raise BadInput(f"the {what} must be at most {MAX_TEXT} printable characters",
                       code="malformed", field=name)
    return text


class SightingCases:
    """The read side and the disclosure of sightings, for one token holder at a time."""

    def __init__(self, desk: LiaisonDesk, cipher: Callable[[], Any]):
        self.desk = desk
        self.db = desk.db
        self.me = desk.me
        self._cipher = cipher

    # -- views ---------------------------------------------------------------------------

    @staticmethod
    def _view(s: Sighting, disclosures: int) -> dict[str, Any]:
        return {"sighting_id": s.sighting_id, "seen_at": rfc3339(s.seen_at),
                "interface": s.interface, "status": s.status,
                "imei": format_imei(Imei(s.imei_key)), "imei_key": s.imei_key, "svn": s.svn,
                "node": s.node, "case_ref": s.case_ref, "subscriber": s.imsi_state,
                "disclosures": disclosures}

    @staticmethod
    def _disclosure(d: SightingDisclosure) -> dict[str, Any]:
        return {"sighting_id": d.sighting_id, "imei": format_imei(Imei(d.imei_key)),
                "case_ref": d.case_ref, "court_order": d.court_order, "court": d.court,
                "disclosed_at": rfc3339(d.disclosed_at), "disclosed_by": d.disclosed_by}

    def _ours(self) -> Any:
        return select(Sighting).join(Record, Record.id == Sighting.record_id).where(
            Record.owner_id == self.me)

    def _counts(self, session: Any, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        return dict(session.execute(
            select(SightingDisclosure.sighting_id, func.count())
            .where(SightingDisclosure.sighting_id.in_(ids))
            .group_by(SightingDisclosure.sighting_id)).all())

    # -- reading -------------------------------------------------------------------------

    def listing(self, caller: Caller, *, case_ref: str | None = None, imei: str | None = None,
             limit: int = 100) -> dict[str, Any]:
        """Sightings of our records, newest first (no IMSI), and our tracked devices seen on
        other operators' networks (``seen_elsewhere``)."""
        self.desk.require(caller, Permission.READ_CASES)
        limit = max(1, min(int(limit), 1000))
        key = parse_lookup(imei).key if imei else None
        if case_ref is not None and len(case_ref) > 64:
            raise BadInput("a case reference is at most 64 characters", code="malformed")
        query = self._ours().order_by(Sighting.seen_at.desc(), Sighting.id.desc()).limit(limit)
        notices = (select(SightingNotice, Record.case_ref)
                   .join(Record, Record.id == SightingNotice.record_id)
                   .where(SightingNotice.direction == "received", Record.owner_id == self.me)
                   .order_by(SightingNotice.seen_at.desc()).limit(limit))
        if case_ref:
            query = query.where(Sighting.case_ref == case_ref)
            notices = notices.where(Record.case_ref == case_ref)
        if key:
            query = query.where(Sighting.imei_key == key)
            notices = notices.where(SightingNotice.imei_key == key)
        with self.db.read() as session:
            rows = session.execute(query).scalars().all()
            counts = self._counts(session, [s.sighting_id for s in rows])
            views = [self._view(s, counts.get(s.sighting_id, 0)) for s in rows]
            elsewhere = [{"imei": format_imei(Imei(n.imei_key)), "imei_key": n.imei_key,
                          "case_ref": ref, "reporter": n.reporter_id,
                          "reporter_country": n.reporter_country, "seen_at": rfc3339(n.seen_at),
                          "text": f"seen on a network of {n.reporter_id} "
                                  f"({n.reporter_country}) at {rfc3339(n.seen_at)}"}
                         for n, ref in session.execute(notices).all()]
        self.desk.audit_read(caller, "sightings", imei_key=key, case_ref=case_ref,
                             count=len(views), elsewhere=len(elsewhere))
        return {"sightings": views, "seen_elsewhere": elsewhere}

    def get(self, caller: Caller, sighting_id: str) -> dict[str, Any]:
        """One sighting of our records (no IMSI) with its disclosures: the case's history."""
        self.desk.require(caller, Permission.READ_CASES)
        with self.db.read() as session:
            row = self._find(session, sighting_id)
            found = session.execute(select(SightingDisclosure).where(
                SightingDisclosure.sighting_id == row.sighting_id)
                .order_by(SightingDisclosure.id)).scalars().all()
            view = self._view(row, len(found))
            view["history"] = [self._disclosure(d) for d in found]
        self.desk.audit_read(caller, "sighting", imei_key=row.imei_key, case_ref=row.case_ref,
                             sighting_id=row.sighting_id)
        return view

    def _find(self, session: Any, sighting_id: str) -> Sighting:
        """Our sighting ``sighting_id``; NotFound (unknown, purged) or Refused (not ours)."""
        shown = sighting_id[:MAX_ID] if sighting_id.isprintable() else "(unprintable)"
        row: Sighting | None = None
        if len(sighting_id) <= MAX_ID:
            row = session.execute(select(Sighting).where(
                Sighting.sighting_id == sighting_id)).scalar_one_or_none()
        if row is None:
            traces = len(sighting_id) <= MAX_ID and any(session.execute(
                select(model.id).where(model.sighting_id == sighting_id).limit(1)).first()
                for model in (SightingDisclosure, SightingAlert))
            if traces:
                raise NotFound(f"sighting {shown} was purged (kept [sightings] retention_days)",
                               "its disclosures stay in the audit trail and the list of "
                               "disclosures", code="sighting_purged")
            raise NotFound(f"no sighting {shown} here",
                           "check the id in the list of sightings (old ones are purged after "
                           "[sightings] retention_days)", code="no_sighting")
        owner = session.execute(select(Record.owner_id).where(
            Record.id == row.record_id)).scalar_one_or_none()
        if owner != self.me:
            raise Refused(f"sighting {shown} is not of one of our cases",
                          "only the operator whose police case tracks the device may see or "
                          "disclose it", code="not_our_case")
        return row

    # -- disclosure ----------------------------------------------------------------------

    def disclose(self, caller: Caller, sighting_id: str, court_order: Any, court: Any
                 ) -> dict[str, Any]:
        """The sighting's IMSI, once, after recording the court order (see the module)."""
        try:
            if not allowed(caller.role, Permission.DISCLOSE_SUBSCRIBER):
                raise NotAllowed(f"a {caller.role} token may not disclose a subscriber",
                                 "only liaison staff may, on a court order",
                                 code="forbidden")
            order = _court_text(court_order, "court_order", "court order reference")
            issuer = _court_text(court, "court", "issuing court")
            now = self.desk.clock()
            # One write transaction: the sighting cannot be purged between the check and the
            # record, and the IMSI leaves only after the record and its audit event commit.
            with self.db.write() as session:
                row = self._find(session, sighting_id)
                imsi = self._decrypt(row)
                disclosure = SightingDisclosure(
                    sighting_id=row.sighting_id, imei_key=row.imei_key, case_ref=row.case_ref,
                    court_order=order, court=issuer, disclosed_at=now,
                    disclosed_by=caller.name)
                session.add(disclosure)
                session.flush()
                audit.append(session, [audit.Event(
                    actor=caller.name, role=caller.role, action="sighting.disclosed",
                    outcome="ok", at=now, imei_key=row.imei_key, case_ref=row.case_ref,
                    detail={"sighting_id": row.sighting_id, "court_order": order,
                            "court": issuer, "disclosure": disclosure.id,
                            "channel": caller.channel})])
                done = {"sighting_id": row.sighting_id, "imei": format_imei(Imei(row.imei_key)),
                        "case_ref": row.case_ref, "seen_at": rfc3339(row.seen_at),
                        "imsi": imsi, "court_order": order, "court": issuer,
                        "disclosed_at": rfc3339(now), "disclosed_by": caller.name,
                        "disclosure": disclosure.id}
        except (BadInput, Refused) as exc:
            self._refused(caller, sighting_id, exc)
            raise
        done["note"] = ("Shown once: this disclosure is recorded in the audit trail. Seeing "
                        "the subscriber again needs a new recorded disclosure.")
        return done

    def _decrypt(self, row: Sighting) -> str:
        if row.imsi_state == "absent" or (row.imsi_state == "present" and not row.imsi_enc):
            raise Refused("the network sent no subscriber identity with this sighting",
                          "there is nothing to disclose; a later sighting may carry one",
                          code="no_imsi")
        if row.imsi_state != "present":
            raise Refused("the subscriber identity sent with this sighting was malformed and "
                          "was not stored", "there is nothing to disclose; a later sighting "
                          "may carry a valid one", code="imsi_malformed")
        try:
            return str(self._cipher().decrypt(row.imsi_enc, context=imsi_context(
                row.sighting_id)))
        except ImeisyncError as exc:
            raise Refused(f"the stored subscriber identity cannot be decrypted ({exc.message})",
                          "the data key that encrypted it is no longer in [security] "
                          "data_key_file; tell the operations team", code="imsi_unreadable"
                          ) from None

    def _refused(self, caller: Caller, sighting_id: str, exc: ImeisyncError) -> None:
        """Record a refused disclosure (who tried, which sighting, why); never the IMSI."""
        with self.db.write() as session:
            audit.append(session, [audit.Event(
                actor=caller.name, role=caller.role, action="sighting.disclosure",
                outcome="refused", at=self.desk.clock(),
                detail={"sighting_id": sighting_id[:MAX_ID], "code": exc.code or "refused",
                        "reason": exc.message[:200], "channel": caller.channel})])

    def disclosures(self, caller: Caller, *, after: int = 0, limit: int = 100
                    ) -> list[dict[str, Any]]:
        """Every disclosure ever recorded (kept after the sighting is purged): for auditors."""
        self.desk.require(caller, Permission.READ_AUDIT)
        limit = max(1, min(int(limit), 1000))
        with self.db.read() as session:
            rows = session.execute(select(SightingDisclosure).where(
                SightingDisclosure.id > after).order_by(SightingDisclosure.id)
                .limit(limit)).scalars().all()
            views = [{"id": d.id, **self._disclosure(d)} for d in rows]
        self.desk.audit_read(caller, "disclosures", after=after, count=len(views))
        return views

    def new_count(self, caller: Caller) -> int:
        """Sightings of our records and notices from elsewhere in the last ``NEW_DAYS`` days
        (a count, no case data; 0 for roles that may not read cases)."""
        if not allowed(caller.role, Permission.READ_CASES):
            return 0
        since = self.desk.clock() - timedelta(days=NEW_DAYS)
        with self.db.read() as session:
            here = session.execute(select(func.count()).select_from(
                self._ours().where(Sighting.seen_at >= since).subquery())).scalar_one()
            elsewhere = session.execute(select(func.count()).select_from(SightingNotice).join(
                Record, Record.id == SightingNotice.record_id).where(
                SightingNotice.direction == "received", Record.owner_id == self.me,
                SightingNotice.seen_at >= since)).scalar_one()
        return int(here) + int(elsewhere)
