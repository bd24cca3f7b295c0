"""What the registry knows about who applied what: apply acknowledgements, receipts and the
signed member directory (``POST /v1/acks``, ``GET /v1/changes/{change_id}/receipt``,
``GET /v1/members``).

Pulling is not applying: a member acknowledges, after its own commit, up to which feed position
it has applied (``applied_through``). The registry keeps the position, when it was last said and
when it last moved, and one row per move, so that "applied by B at T" is one index lookup.

A receipt answers, for one of the caller's own changes, every member whose receive profile
includes it: applied (and when) or not yet (how far behind, since when silent). It is returned
as a JWS signed with the registry's key, so the owner can hand it to the police and anyone can
check it offline with the registry's public key (``imeisync receipt verify``).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update

from imeisync.adapters.signed_documents import MEMBERS_TYP, RECEIPT_TYP, sign_document
from imeisync.domain.errors import BadInput, NotAllowed, NotFound, Refused
from imeisync.registry import canaries
from imeisync.registry.config import Member, RegistryConfig
from imeisync.registry.models import AckStep, FeedEntry, MemberAck, Submission
from imeisync.registry.service import rfc3339
from imeisync.store.db import Database


class Receipts:
    def __init__(self, db: Database, config: RegistryConfig, clock: Callable[[], datetime]):
        self.db = db
        self.config = config
        self.clock = clock

    # -- POST /v1/acks ----------------------------------------------------------------------

    def acknowledge(self, member: Member, body: Any) -> dict[str, Any]:
        """Record that ``member`` applied the feed through ``applied_through``.

        Idempotent: an ack at or behind the stored position changes nothing (a replay, or a
        late retry) and answers the stored position. Ahead of the feed's head is refused.
        """
        if not isinstance(body, dict) or set(body) != {"applied_through"}:
            raise BadInput('an ack is {"applied_through": SEQ}', code="malformed")
        through = body["applied_through"]
        if not isinstance(through, int) or isinstance(through, bool) or through < 0:
            raise BadInput(f"applied_through must be a whole number ≥ 0, not "
                           f"{str(through)[:20]!r}", code="malformed")
        now = rfc3339(self.clock())
        with self.db.write() as session:
            conn = session.connection()
            head = conn.execute(select(func.coalesce(func.max(FeedEntry.seq), 0))).scalar_one()
            if through > head:
                raise Refused(f"applied_through {through} is ahead of the feed's head {head}: "
                              "nobody can have applied what the registry has not sent",
                              "acknowledge only the feed position your last committed pull "
                              "reached", code="ack_ahead")
            row = conn.execute(select(MemberAck).where(MemberAck.member_id == member.id)
                               .with_for_update()).first()
            if row is None:
                conn.execute(insert(MemberAck).values(member_id=member.id,
                                                      applied_through=through, acked_at=now,
                                                      moved_at=now))
                moved, position, moved_at = True, through, now
            else:
                moved = through > row.applied_through
                position = max(through, row.applied_through)
                moved_at = now if moved else row.moved_at
                conn.execute(update(MemberAck).where(MemberAck.member_id == member.id)
                             .values(applied_through=position, acked_at=now, moved_at=moved_at))
            if moved:
                conn.execute(insert(AckStep).values(member_id=member.id,
                                                    applied_through=through, at=now))
        return {"member": member.id, "applied_through": position, "acked_at": now,
                "moved_at": moved_at, "head": head}

    # -- GET /v1/changes/{change_id}/receipt ------------------------------------------------

    def receipt(self, member: Member, change_id: str) -> dict[str, Any]:
        """``{"receipt": {...}, "jws": token}`` for one of ``member``'s changes."""
        with self.db.read() as session:
            conn = session.connection()
            mine = conn.execute(select(Submission.seq, Submission.result).where(
                Submission.operator_id == member.id,
                Submission.change_id == change_id)).first()
            if mine is None or mine.result != "accepted" or mine.seq is None:
                others = conn.execute(select(Submission.operator_id).where(
                    Submission.change_id == change_id).limit(1)).first()
                # A canary's change answers as another member's does: no tell-tale 404.
                if mine is None and (others is not None
                                     or canaries.is_canary_change(conn, change_id)):
                    raise NotAllowed("receipts are given only to the change's owner",
                                     "ask for receipts of your own changes", code="not_owner")
                raise NotFound(f"no accepted change {change_id[:80]} of {member.id}",
                               "a receipt exists once the registry accepted the change",
                               code="no_change")
            entry = conn.execute(select(FeedEntry).where(FeedEntry.seq == mine.seq)).one()
            head = conn.execute(select(func.coalesce(func.max(FeedEntry.seq), 0))).scalar_one()
            recipients = [m for m in self.config.members.values()
                          if m.id != member.id and m.receives_from(entry.owner_id,
                                                                   entry.owner_country)]
            ids = [m.id for m in recipients]
            acks = {a.member_id: a for a in conn.execute(
                select(MemberAck).where(MemberAck.member_id.in_(ids)))} if ids else {}
            applied_at: dict[str, str] = {}
            for m in recipients:
                ack = acks.get(m.id)
                if ack is not None and ack.applied_through >= entry.seq:
                    # positions only grow, so the first step at or past seq is when
                    applied_at[m.id] = conn.execute(
                        select(AckStep.at).where(AckStep.member_id == m.id,
                                                 AckStep.applied_through >= entry.seq)
                        .order_by(AckStep.applied_through).limit(1)).scalar_one()
        rows = []
        for m in recipients:
            ack = acks.get(m.id)
            row: dict[str, Any] = {"member": m.id, "country": m.country,
                                   "applied": m.id in applied_at}
            if m.id in applied_at:
                row["applied_at"] = applied_at[m.id]
            else:
                row.update(applied_through=ack.applied_through if ack else None,
                           behind=head - ack.applied_through if ack else head,
                           last_ack_at=ack.acked_at if ack else None,
                           # silent since: its position has not moved past this change since
                           behind_since=max(ack.moved_at, entry.received_at) if ack
                           else entry.received_at)
            rows.append(row)
        applied = sum(1 for r in rows if r["applied"])
        receipt = {"registry": self.config.kid, "change_id": change_id, "owner": member.id,
                   "owner_country": member.country, "seq": entry.seq, "action": entry.action,
                   "imei": entry.imei_key, "at": entry.at, "received_at": entry.received_at,
                   "issued_at": rfc3339(self.clock()), "head": head, "applied": applied,
                   "total": len(rows), "complete": applied == len(rows), "recipients": rows}
        assert self.config.signing_key is not None
        return {"receipt": receipt,
                "jws": sign_document(receipt, self.config.signing_key, self.config.kid,
                                     RECEIPT_TYP)}

    # -- GET /v1/members --------------------------------------------------------------------

    def members(self) -> dict[str, Any]:
        """The member directory (id, country, raw Ed25519 public key in base64url), signed."""
        directory = {"registry": self.config.kid, "issued_at": rfc3339(self.clock()),
                     "members": [{"id": m.id, "country": m.country,
                                  "public_key": public_key_text(m)}
                                 for m in sorted(self.config.members.values(),
                                                 key=lambda m: m.id)]}
        assert self.config.signing_key is not None
        return {**directory, "jws": sign_document(directory, self.config.signing_key,
                                                  self.config.kid, MEMBERS_TYP)}


def public_key_text(member: Member) -> str:
    assert member.public_key is not None
    return base64.urlsafe_b64encode(member.public_key.public_bytes_raw()).decode().rstrip("=")
