"""The end of an order's road: from "confirmed by the registry" to "applied by N of M
operators" and "applied everywhere", read from the registry's stored receipts
(``services/sync/receipts.py``); and the order whose changes never left us ("withdrawn").

Steps and states are the contract's: ``accepted``, ``sent``, ``confirmed``, ``applied`` (with
``applied_by`` and ``missing``: names, countries and how stale each missing one is),
``applied_everywhere``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from imeisync.domain.errors import NotFound, Refused
from imeisync.domain.times import rfc3339
from imeisync.store.models import ChangeReceipt, OutboxChange

WITHDRAWN = "withdrawn"  # a lift that overtook its own unsent block: neither left us


def receipts_of(session: Session, change_ids: Iterable[str]) -> dict[str, ChangeReceipt]:
    ids = list(change_ids)
    found: dict[str, ChangeReceipt] = {}
    for start in range(0, len(ids), 500):
        for r in session.execute(select(ChangeReceipt).where(
                ChangeReceipt.change_id.in_(ids[start:start + 500]))).scalars():
            found[r.change_id] = r
    return found


def applied_steps(receipt: ChangeReceipt | None) -> tuple[str, list[dict[str, Any]],
                                                           dict[str, Any] | None]:
    """(state, the two last steps, the receipt's summary) of a confirmed change."""
    if receipt is None:
        return "confirmed", [{"step": "applied", "done": False, "at": None, "applied_by": [],
                              "missing": None, "count": None},
                             {"step": "applied_everywhere", "done": False, "at": None}], None
    recipients = json.loads(receipt.recipients)
    applied_by = [{"member": r["member"], "country": r.get("country"),
                   "at": r.get("applied_at")} for r in recipients if r.get("applied")]
    missing = [{"member": r["member"], "country": r.get("country"),
                "behind": r.get("behind"), "behind_since": r.get("behind_since"),
                "last_ack_at": r.get("last_ack_at")}
               for r in recipients if not r.get("applied")]
    summary = {"applied": receipt.applied, "of": receipt.total, "complete": receipt.complete,
               "applied_by": applied_by, "missing": missing,
               "as_of": rfc3339(receipt.fetched_at), "seq": receipt.seq}
    latest = max((m["at"] for m in applied_by if m["at"]), default=None)
    steps = [{"step": "applied", "done": receipt.applied > 0 or receipt.complete,
              "at": latest, "applied_by": applied_by, "missing": missing,
              "count": f"{receipt.applied} of {receipt.total}"},
             {"step": "applied_everywhere", "done": receipt.complete,
              "at": rfc3339(receipt.completed_at)}]
    return ("applied_everywhere" if receipt.complete else "applied"), steps, summary


def next_step(state: str, receipt: dict[str, Any] | None, effect: str) -> str | None:
    """The sentence for the person asking, for the states this module adds."""
    if state == WITHDRAWN:
        return ("Withdrawn before it left this operator: the lift cancelled the block while "
                "both were still unsent, so nothing reached the registry. Nothing to do.")
    if state == "applied_everywhere" and receipt is not None:
        return (f"Done: every one of the {receipt['of']} operator(s) that receive our records "
                f"has applied it (the device is {effect}ed everywhere). The registry-signed "
                "receipt can be downloaded.")
    if state == "applied" and receipt is not None:
        missing = "; ".join(
            f"{m['member']} ({m['country']}) behind since {m['behind_since'] or '?'}"
            for m in receipt["missing"])
        return (f"Applied by {receipt['applied']} of {receipt['of']} operators; still "
                f"missing: {missing}. They apply it at their next sync; if one stays behind "
                "past the receipt deadline, the operations team is alerted.")
    return None


def complete_receipt(session: Session, order_id: str) -> ChangeReceipt:
    """The registry-signed receipt of an order, once every recipient applied it."""
    change_id = session.execute(select(OutboxChange.change_id).where(
        OutboxChange.order_id == order_id).order_by(OutboxChange.id.desc())).scalars().first()
    if change_id is None:
        raise NotFound(f"order {order_id[:130]} sent nothing to the registry here",
                       "check the order id and its progress", code="no_order")
    receipt = session.get(ChangeReceipt, change_id)
    if receipt is None or not receipt.complete:
        so_far = f"{receipt.applied} of {receipt.total}" if receipt else "no receipt yet"
        raise Refused(f"order {order_id[:130]} is not applied everywhere yet ({so_far})",
                      "see the order's progress; the receipt can be downloaded once every "
                      "recipient operator applied it", code="incomplete")
    return receipt
