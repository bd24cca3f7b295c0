"""Who may do what: the four roles of API tokens and what each is granted, written once.

A person or system is known only by its token (``imeisync token add --name --role``); the role
comes from the token, never from a request. The HTTP API, the web console and the services ask
``allowed(role, permission)`` — this table is the whole policy.

>>> allowed("liaison", Permission.SUBMIT_ORDER), allowed("auditor", Permission.SUBMIT_ORDER)
(True, False)
>>> allowed("network", Permission.READ_CASES)
False
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    LIAISON = "liaison"  # police liaison staff: orders, devices, disputes
    NETWORK = "network"  # a network function: the attach check only
    AUDITOR = "auditor"  # reads the audit trail and case details; writes nothing
    ADMIN = "admin"  # tokens and exceptions; no case details


class Permission(StrEnum):
    SUBMIT_ORDER = "order.submit"  # blocks, signed orders (block, track, lift)
    READ_CASES = "case.read"  # our records' case details, order progress, disputes
    READ_NOTES = "note.read"  # the decrypted liaison notes of our records
    FILE_DISPUTE = "dispute.file"
    ANSWER_DISPUTE = "dispute.answer"  # "upheld"; a lift is a police order (SUBMIT_ORDER)
    READ_AUDIT = "audit.read"
    ATTACH_CHECK = "attach.check"
    MANAGE_TOKENS = "token.manage"
    MANAGE_EXCEPTIONS = "exception.manage"
    # a sighting's subscriber identity (IMSI), on a recorded court order; reading sightings
    # without it is READ_CASES
    DISCLOSE_SUBSCRIBER = "subscriber.disclose"
    USE_CONSOLE = "console"  # may sign in to the web console


GRANTS: dict[Role, frozenset[Permission]] = {
    Role.LIAISON: frozenset({
        Permission.SUBMIT_ORDER, Permission.READ_CASES, Permission.READ_NOTES,
        Permission.FILE_DISPUTE, Permission.ANSWER_DISPUTE, Permission.USE_CONSOLE,
        Permission.DISCLOSE_SUBSCRIBER,
    }),
    Role.AUDITOR: frozenset({
        Permission.READ_CASES, Permission.READ_NOTES, Permission.READ_AUDIT,
        Permission.USE_CONSOLE,
    }),
    Role.NETWORK: frozenset({Permission.ATTACH_CHECK}),
    Role.ADMIN: frozenset({Permission.MANAGE_TOKENS, Permission.MANAGE_EXCEPTIONS}),
}

ROLES: tuple[str, ...] = tuple(str(r) for r in Role)

DESCRIPTIONS: dict[Role, str] = {
    Role.LIAISON: "police liaison staff: submit orders, look up devices, file and answer disputes, "
                  "disclose a sighting's subscriber on a court order",
    Role.NETWORK: "a network function: the attach check only",
    Role.AUDITOR: "reads the audit trail and case details, changes nothing",
    Role.ADMIN: "manages tokens and exceptions; sees no case details",
}


def allowed(role: str, permission: Permission) -> bool:
    """Whether ``role`` (a token's role; anything unknown has no rights) grants ``permission``."""
    try:
        return permission in GRANTS[Role(role)]
    except ValueError:
        return False


def roles_with(permission: Permission) -> list[str]:
    """The roles granting ``permission``, for messages ("needs a liaison or auditor token")."""
    return [str(role) for role, granted in GRANTS.items() if permission in granted]
