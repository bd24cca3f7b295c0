"""One mapping from imeisync's errors to HTTP statuses, shared by the police API, the web
console and the reference registry (``entrypoints/http.py``): 400 malformed, 403 not allowed,
404 no such thing, 409 conflict, 422 refused by a rule, 500 a bug, 503 unavailable.

The table is checked once here; then the same refusal is sent to the API and to the console
(real app, in-process) and to the registry (real server app, real signatures), which must agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from imeisync.domain.errors import (
    BadInput,
    Conflict,
    ImeisyncError,
    InternalError,
    NotAllowed,
    NotFound,
    Refused,
    Unavailable,
)
from imeisync.domain.imei import InvalidChecksum
from imeisync.entrypoints.http import PROBLEM_BASE, Problem, status_of
from support.fixtures_api import Api, imei, problem
from support.fixtures_app import Police
from support.registry_lab import InProcessRegistry


@pytest.mark.parametrize(("error", "status"), [
    (BadInput("malformed"), 400),
    (InvalidChecksum("check digit"), 400),  # a kind of BadInput is still 400
    (NotAllowed("role"), 403),
    (NotFound("no order"), 404),
    (Conflict("replayed"), 409),
    (Refused("not the owner"), 422),
    (ImeisyncError("some other rule"), 422),
    (InternalError("a bug"), 500),
    (Unavailable("database down"), 503),
])
def test_each_kind_of_error_has_one_status(error: ImeisyncError, status: int) -> None:
    assert status_of(error) == status


def test_a_problem_carries_code_hint_and_a_retry_after_when_unavailable() -> None:
    down = Problem.of(Unavailable("the database is down", "try again"))
    assert (down.status, down.code, down.headers) == (503, "unavailable", {"Retry-After": "30"})
    body = json.loads(down.body())
    assert body == {"type": PROBLEM_BASE + "unavailable", "title": "Service Unavailable",
                    "status": 503, "detail": "the database is down", "code": "unavailable",
                    "hint": "try again"}
    own = Problem.of(Refused("no", code="order_too_old"))
    assert (own.status, own.code, own.headers) == (422, "order_too_old", {})
    assert json.loads(Problem(401, "bad signature").body())["type"] == "about:blank"


# -- the police API and the console agree ----------------------------------------------------


def _upload(api: Api, csrf: str, token: str) -> int:
    return api.client.post("/upload", data={"csrf": csrf, "order_text": token}).status_code


def test_a_replayed_order_is_409_in_the_api_and_the_console(api: Api, police: Police) -> None:
    token = police.sign("block", imei(41))
    headers = api.headers("liaison", **{"content-type": "application/jose"})
    assert api.client.post("/api/v1/orders", headers=headers, content=token).status_code == 201
    problem(api.client.post("/api/v1/orders", headers=headers, content=token), 409,
            "replayed_order_id")
    csrf = api.sign_in()
    answer = api.client.post("/upload", data={"csrf": csrf, "order_text": token})
    assert answer.status_code == 409
    assert "already received" in answer.text


def test_a_malformed_signed_order_is_400_in_the_api_and_the_console(api: Api) -> None:
    token = "not.a-signed.order"
    headers = api.headers("liaison", **{"content-type": "application/jose"})
    problem(api.client.post("/api/v1/orders", headers=headers, content=token), 400)
    assert _upload(api, api.sign_in(), token) == 400


def test_an_unknown_order_is_404_in_the_api_and_the_console(api: Api) -> None:
    problem(api.client.get("/api/v1/orders/NO-SUCH-1", headers=api.headers("liaison")), 404,
            "no_order")
    api.sign_in()
    assert api.client.get("/orders/NO-SUCH-1").status_code == 404


def test_an_order_signed_by_an_untrusted_key_is_422_in_the_api_and_the_console(
        api: Api, tmp_path: Path) -> None:
    from imeisync.adapters.keys import generate_keypair

    stranger, _ = generate_keypair("stranger", tmp_path / "stranger")
    token = Police(stranger, "stranger").sign("block", imei(42))
    headers = api.headers("liaison", **{"content-type": "application/jose"})
    problem(api.client.post("/api/v1/orders", headers=headers, content=token), 422)
    assert _upload(api, api.sign_in(), token) == 422


# -- the registry ----------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[InProcessRegistry]:
    reg = InProcessRegistry(tmp_path / "lab", [("op-a", "DK"), ("op-b", "SE")],
                            f"sqlite:///{tmp_path / 'reg.db'}")
    yield reg
    reg.close()


def test_the_registry_answers_an_unknown_dispute_404(registry: InProcessRegistry) -> None:
    """404 with the message, its code and its hint, which the registry client shows again."""
    with pytest.raises(Refused, match=r"HTTP 404\): no such dispute op-b:none — .*feed") as e:
        registry.client("op-a").answer_dispute("op-b:none", "upheld", "no such thing")
    assert "(code no_dispute)" in str(e.value)


def test_the_registry_answers_a_malformed_answer_400(registry: InProcessRegistry) -> None:
    with pytest.raises(BadInput, match=r"HTTP 400.*answer must be upheld or lifted"):
        registry.client("op-a").answer_dispute("op-b:none", "maybe", "x")
