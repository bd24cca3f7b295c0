"""A member's batch (``{"changes": [...]}``, ``{"sightings": [...]}``): its shape, checked
whole before any item is looked at so that a malformed batch changes nothing, and the answer
to an item sent again (idempotency by the item's id)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from imeisync.domain import fields
from imeisync.domain.errors import BadInput
from imeisync.registry.codes import MALFORMED


def batch_items(body: Any, key: str, id_name: str, noun: str, limit: int,
                ) -> list[dict[str, Any]]:
    """The items of ``body[key]``: a list of at most ``limit`` JSON objects, each with a valid
    ``id_name`` unique in the batch; ``BadInput`` (``malformed_batch``) naming the first fault."""

    def malformed(message: str) -> BadInput:
        return BadInput(message, f"send {{\"{key}\": [...]}} with at most {limit} {noun}s, each "
                        f"with a unique {id_name}", code="malformed_batch")

    if not isinstance(body, dict) or set(body) != {key}:
        raise malformed(f"the body must be a JSON object with exactly one key, {key}")
    items = body[key]
    if not isinstance(items, list):
        raise malformed(f"{key} must be a list")
    if len(items) > limit:
        raise malformed(f"{len(items)} {noun}s in one batch; at most {limit}")
    seen: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise malformed(f"{noun} #{index + 1} is not a JSON object")
        item_id = item.get(id_name)
        if not isinstance(item_id, str) or not fields.REFERENCE_ID.fullmatch(item_id):
            raise malformed(f"{noun} #{index + 1} has no valid {id_name}")
        if item_id in seen:
            raise malformed(f"{id_name} {item_id} appears twice in the batch")
        seen.add(item_id)
    return items


def digest(item: dict[str, Any]) -> str:
    """What an item's idempotency compares: the SHA-256 of its canonical JSON."""
    return hashlib.sha256(
        json.dumps(item, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def answer_again(before: Any, item_digest: str, id_name: str, item_id: str,
                 noun: str) -> dict[str, Any]:
    """The answer to an item sent again (``before``: the stored answer with its ``digest``,
    ``result``, ``code``, ``message``): the same answer, ``duplicate`` for an accepted one,
    ``0011`` when the id now names other content."""
    if before.digest != item_digest:
        return {"result": "rejected", "code": MALFORMED,
                "message": f"{id_name} {item_id} was already used for a different {noun}; "
                           f"a new {noun} needs a new {id_name}"}
    if before.result == "accepted":
        return {"result": "duplicate"}
    return {"result": "rejected", "code": before.code, "message": before.message}
