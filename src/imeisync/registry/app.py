"""The reference registry's HTTP interface (Starlette, served by Granian): see
``docs/api/registry.yaml``.

Every ``/v1`` request must carry an RFC 9421 signature by a member's key (``keyid`` = the
member's operator id), at most five minutes old, covering the body's Content-Digest; anything
else is a 401 and nothing changes. Every response the registry gives is signed with its own key,
so that operators can verify what they apply. Errors are ``application/problem+json``, with the
statuses every imeisync HTTP interface gives (``entrypoints/http.py``): 400 malformed, 401 bad
signature, 403 not the owner, 404 no such dispute, 409 conflict, 413 too large, 422 refused by a
rule, 429 over a rate limit and 503 database unavailable or too many snapshots at once (both with
``Retry-After``; ``registry/limits.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from imeisync.adapters.http_signatures import (
    InvalidSignature,
    headers_dict,
    keyid_of,
    sign_response,
    snapshot_trailer_signature,
    verify_request,
)
from imeisync.domain.errors import BadInput, ImeisyncError, Unavailable
from imeisync.entrypoints.http import PROBLEM, Problem, client_address, read_body
from imeisync.registry import canaries
from imeisync.registry.codes import MALFORMED
from imeisync.registry.config import Member, RegistryConfig, load_registry_config
from imeisync.registry.limits import Limits
from imeisync.registry.receipts import Receipts
from imeisync.registry.schema import ensure_schema
from imeisync.registry.service import DEFAULT_PAGE, MAX_PAGE, Registry
from imeisync.store.db import Database

log = logging.getLogger("imeisync.registry")

# Not IMEISYNC_REGISTRY_…: that prefix belongs to the operator config's [registry] overrides.
CONFIG_ENV = "IMEISYNC_CENTRAL_REGISTRY_CONFIG"
MAX_BODY = 4 * 1024 * 1024  # 1,000 changes are ~250 kB


class RegistryApp:
    def __init__(self, config: RegistryConfig, db: Database | None = None):
        self.config = config
        self.db = db or Database(config.database_url)
        ensure_schema(self.db)
        self.registry = Registry(self.db, config)
        canaries.plant(self.db, config, self.registry.clock())  # those missing, once
        self.receipts = Receipts(self.db, config, self.registry.clock)
        assert config.signing_key is not None, "the registry needs its signing key"
        self.key = config.signing_key
        self.limits = Limits(config)
        self._health = (float("-inf"), False)  # (when, database reachable)
        self.app = Starlette(routes=[
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/v1/changes", self.post_changes, methods=["POST"]),
            Route("/v1/changes", self.get_changes, methods=["GET"]),
            Route("/v1/changes/{change_id}/receipt", self.get_receipt, methods=["GET"]),
            Route("/v1/acks", self.post_ack, methods=["POST"]),
            Route("/v1/members", self.get_members, methods=["GET"]),
            Route("/v1/snapshot", self.get_snapshot, methods=["GET"]),
            Route("/v1/disputes", self.post_dispute, methods=["POST"]),
            Route("/v1/sightings", self.post_sightings, methods=["POST"]),
            Route("/v1/disputes/{dispute_id}/answer", self.post_answer, methods=["POST"]),
        ], lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            self.db.dispose()

    # -- plumbing -------------------------------------------------------------------------

    def _signed(self, request: Request, status: int, body: bytes,
                content_type: str = "application/json") -> Response:
        headers = sign_response(request.method, str(request.url),
                                headers_dict(request.headers.items()), status,
                                {"content-type": content_type}, body, self.key, self.config.kid)
        return Response(body, status_code=status, headers=headers)

    def _json(self, request: Request, status: int, data: Any) -> Response:
        return self._signed(request, status, json.dumps(data, separators=(",", ":")).encode())

    def _problem(self, request: Request, problem: Problem) -> Response:
        response = self._signed(request, problem.status, problem.body(), PROBLEM)
        response.headers.update(problem.headers)  # Retry-After: not part of the signature
        return response

    async def _authenticate(self, request: Request) -> tuple[Member, bytes]:
        """The member whose signature the request carries, and the body — before any database
        work (``registry/limits.py``): refused before the body is read when the address keeps
        failing or the claimed member's allowance is spent; spent only once verified."""
        claimed = keyid_of(request.headers)
        claimed_member = self.config.members.get(claimed or "")
        # A forger hurts only the member it claims to be, and only from its own address.
        address = f"{client_address(request)} {claimed if claimed_member else '?'}"
        self.limits.before_signature(address, claimed_member)
        body = await read_body(request, MAX_BODY, "send at most 1,000 changes per batch")

        def public_key(key_id: str) -> Any:
            member = self.config.members.get(key_id)
            return member.public_key if member else None

        try:
            key_id = verify_request(request.method, str(request.url),
                                    headers_dict(request.headers.items()), body, public_key)
        except InvalidSignature as exc:
            log.warning("refused %s %s from %s: %s", request.method, request.url.path,
                        claimed or "(no keyid)", exc)
            who = f" (keyid {claimed!r})" if claimed else ""
            if claimed and claimed not in self.config.members:
                detail = f"keyid {claimed!r} is not a member of this registry"
            else:
                detail = f"the request's signature{who} is not valid: {exc}"
            self.limits.bad_signature(address)
            raise Problem(401, detail) from None
        member = self.config.members[key_id]
        self.limits.admit(member)
        return member, body

    async def _handle(self, request: Request, work: Any) -> Response:
        try:
            member, body = await self._authenticate(request)
            status, data = await run_in_threadpool(work, member, body)
            return self._json(request, status, data)
        except Problem as problem:
            return self._problem(request, problem)
        except ImeisyncError as exc:
            if isinstance(exc, Unavailable):
                log.error("database unavailable: %s", exc)
            # A malformed request without a code of its own gets the registry's 0011.
            default = MALFORMED if isinstance(exc, BadInput) else None
            return self._problem(request, Problem.of(exc, default))

    @staticmethod
    def _json_body(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInput(f"the body is not JSON: {exc}", code="malformed_batch") from None

    # -- endpoints ------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        now = time.monotonic()
        if now - self._health[0] >= 1.0:  # a flood of probes pings the database once a second
            self._health = (now, await run_in_threadpool(self.db.ping))
        ok = self._health[1]
        return self._json(request, 200 if ok else 503, {"database": "ok" if ok else "down"})

    async def post_changes(self, request: Request) -> Response:
        def work(member: Member, body: bytes) -> tuple[int, Any]:
            result = self.registry.submit(member, self._json_body(body))
            log.info("%s sent %d change(s): %d accepted", member.id, len(result["results"]),
                     result["accepted"])
            return 200, result

        return await self._handle(request, work)

    async def get_changes(self, request: Request) -> Response:
        def work(member: Member, _body: bytes) -> tuple[int, Any]:
            after = _int_param(request, "after", 0, 0, 2**62)
            limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
            return 200, self.registry.feed(member, after, limit)

        return await self._handle(request, work)

    async def post_ack(self, request: Request) -> Response:
        def work(member: Member, body: bytes) -> tuple[int, Any]:
            return 200, self.receipts.acknowledge(member, self._json_body(body))

        return await self._handle(request, work)

    async def get_receipt(self, request: Request) -> Response:
        change_id = request.path_params["change_id"]

        def work(member: Member, _body: bytes) -> tuple[int, Any]:
            return 200, self.receipts.receipt(member, change_id)

        return await self._handle(request, work)

    async def get_members(self, request: Request) -> Response:
        def work(_member: Member, _body: bytes) -> tuple[int, Any]:
            return 200, self.receipts.members()

        return await self._handle(request, work)

    async def get_snapshot(self, request: Request) -> Response:
        try:
            member, _body = await self._authenticate(request)
            release = self.limits.snapshot_slot(member)
        except Problem as problem:
            return self._problem(request, problem)
        try:
            snapshot = self.registry.snapshot(member)
            seq = await run_in_threadpool(snapshot.open)
        except Unavailable as exc:
            release()
            return self._problem(request, Problem.of(exc))
        except BaseException:
            release()
            raise
        headers = sign_response(
            request.method, str(request.url), headers_dict(request.headers.items()), 200,
            {"content-type": "text/csv; charset=utf-8", "snapshot-seq": str(seq)}, None,
            self.key, self.config.kid)
        header_signature = headers["Signature"].encode("ascii")

        def trailer(sha256_hex: str, records: int, at_seq: int) -> str:
            signature = snapshot_trailer_signature(self.key, header_signature, sha256_hex,
                                                   records, at_seq)
            return f"#end records={records} seq={at_seq} sha256={sha256_hex} sig={signature}\n"

        log.info("snapshot at seq %d for %s", seq, member.id)
        def lines() -> Iterator[bytes]:
            try:
                yield from snapshot.lines(trailer)
            finally:  # also when the member hangs up mid-stream (the generator is closed)
                release()

        def finish() -> None:
            try:
                snapshot.close()
            finally:
                release()

        # The background task closes the read transaction (and frees the snapshot slot) even
        # if the stream never started.
        return StreamingResponse(lines(), headers=headers, background=BackgroundTask(finish))

    async def post_dispute(self, request: Request) -> Response:
        def work(member: Member, body: bytes) -> tuple[int, Any]:
            return self.registry.file_dispute(member, self._json_body(body))

        return await self._handle(request, work)

    async def post_sightings(self, request: Request) -> Response:
        def work(member: Member, body: bytes) -> tuple[int, Any]:
            result = self.registry.submit_sightings(member, self._json_body(body))
            log.info("%s sent %d sighting notice(s): %d accepted", member.id,
                     len(result["results"]), result["accepted"])
            return 200, result

        return await self._handle(request, work)

    async def post_answer(self, request: Request) -> Response:
        dispute_id = request.path_params["dispute_id"]

        def work(member: Member, body: bytes) -> tuple[int, Any]:
            return 200, self.registry.answer_dispute(member, dispute_id, self._json_body(body))

        return await self._handle(request, work)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise BadInput(f"query parameter {name}={raw[:20]!r} must be a whole number from "
                       f"{low} to {high}", code="malformed")
    return int(raw)


def create_app(config: RegistryConfig | None = None) -> Starlette:
    """The ASGI app; without ``config``, from the file ``$IMEISYNC_CENTRAL_REGISTRY_CONFIG``
    names (how ``imeisync registry serve`` hands it to Granian's worker processes)."""
    if config is None:  # in a Granian worker of `imeisync registry serve`
        from imeisync.adapters.lifecycle import DRAIN, granian_worker_startup

        granian_worker_startup(DRAIN)
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise BadInput(f"{CONFIG_ENV} is not set", "start the registry with "
                           "`imeisync registry serve --config REGISTRY.toml`")
        config = load_registry_config(path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return RegistryApp(config).app
