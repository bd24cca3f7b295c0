#!/usr/bin/env python3
"""S13 (Diameter) attach-check benchmark (not a test): ECR/s and latency, with its references.

    .venv/bin/python scripts/bench/s13.py [--entries 1M] [--duration 5] [--pin] [--workdir DIR]

1. Codec, in process, on the same 20,000 ECRs (half listed, IMEI+IMSI): our ECR→ECA path
   (``S13App.answer``: decode, verdict from the attach index, encode) against python-diameter
   (``Message.from_bytes`` + ``MeIdentityCheckAnswer`` + ``as_bytes``), µs per message.
2. Over loopback TCP, with 1 and 8 peers and 32 and 64 outstanding requests per peer:
   * ``s13``    -- ``python -m imeisync.entrypoints.s13`` (one process, uvloop);
   * ``h2c``    -- our own N5g-eir attach check (one Granian worker) loaded by h2load with the
                   same connection count and outstanding streams (``-m``);
   * ``pydiam`` -- python-diameter's ``Node`` answering the same ECRs from the same index;
   * ``null``   -- a Diameter server that answers every request with one constant answer and
                   does nothing else: the load generator's own ceiling on this machine.
   The load generator is an asyncio (uvloop) process keeping ``outstanding`` ECRs in flight on
   each connection, timing every request. With ``--pin`` servers run on core 0 and the load
   generators (ours and h2load) on core 1.

Unknown devices are answered per ``unknown_status = NOT_FOUND`` (Experimental-Result 5422), so
half of the answers are the one python-diameter mishandles on its answering side: its
``Node._record_answer`` passes the answer's absent Result-Code (None) to its statistics, which
raise; the benchmark patches that one call (``_patch_python_diameter``) so the comparison runs.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

from attach_http import Proc, free_port, parse_size, pin  # noqa: E402

from imeisync.adapters.diameter import codec as c  # noqa: E402

QUERIES = 20_000
REALM = "bench.invalid"
MME = "mme{}.bench.invalid"
EIR = "eir1.bench.invalid"
TARGET_P99_MS = 2.0


# -- messages ---------------------------------------------------------------------------------


def make_ecr(key: int, imsi: str, hbh: int) -> bytes:
    origin = (c.avp_text(c.ORIGIN_HOST, MME.format(1)), c.avp_text(c.ORIGIN_REALM, REALM))
    terminal = c.avp_grouped(c.TERMINAL_INFORMATION,
                             c.avp_text(c.IMEI, f"{key:014d}", vendor=c.VENDOR_3GPP),
                             c.avp_text(c.SOFTWARE_VERSION, "01", vendor=c.VENDOR_3GPP),
                             vendor=c.VENDOR_3GPP)
    return c.message(c.FLAG_R | c.FLAG_P, c.CMD_ECR, c.APP_S13, hbh, hbh,
                     c.avp_text(c.SESSION_ID, f"{MME.format(1)};{hbh};1"),
                     c.avp_u32(c.AUTH_SESSION_STATE, 1), *origin,
                     c.avp_text(c.DESTINATION_REALM, REALM), terminal,
                     c.avp_text(c.USER_NAME, imsi))


def cer(host: str) -> bytes:
    return c.message(c.FLAG_R, c.CMD_CER, 0, 1, 1, c.avp_text(c.ORIGIN_HOST, host),
                     c.avp_text(c.ORIGIN_REALM, REALM),
                     c.avp_address(c.HOST_IP_ADDRESS, "127.0.0.1"), c.avp_u32(c.VENDOR_ID, 0),
                     c.avp_text(c.PRODUCT_NAME, "bench", mandatory=False),
                     c.avp_u32(c.AUTH_APPLICATION_ID, c.APP_S13))


def prepare(workdir: Path, entries: int) -> tuple[Path, list[tuple[int, str]]]:
    from benchdata import clustered_index, fill_sqlite

    db = workdir / "store.db"
    marker = workdir / "store.json"
    data = clustered_index(entries, probes=QUERIES // 2)
    if not (marker.exists() and json.loads(marker.read_text()).get("n") == entries
            and db.exists()):
        for old in workdir.glob("store.db*"):
            old.unlink()
        seconds = fill_sqlite(db, data)
        marker.write_text(json.dumps({"n": entries}))
        print(f"store: {entries:,} records written in {seconds:.0f}s")
    rng = random.Random(3)
    queries = [(key, f"23801{rng.randrange(10**10):010d}")
               for key in data.present[:QUERIES // 2] + data.absent[:QUERIES // 2]]
    rng.shuffle(queries)
    return db, queries


def write_config(workdir: Path, db: Path, eir_port: int, s13_port: int, peers: int) -> Path:
    config = workdir / "imeisync.toml"
    hosts = ", ".join(f'"{MME.format(n)}"' for n in range(1, peers + 1))
    config.write_text(
        f'[database]\nurl = "sqlite:///{db}"\n'
        f'[eir]\nlisten = "127.0.0.1:{eir_port}"\nworkers = 1\nunknown_status = "NOT_FOUND"\n'
        # capacity, not admission control (attach_overload.py measures that)
        'max_inflight = 1000000000\nper_client_share = 1.0\n'
        f'index_file = "{workdir / "attach-index.bin"}"\n'
        f'[s13]\nlisten = "127.0.0.1:{s13_port}"\norigin_host = "{EIR}"\n'
        f'origin_realm = "{REALM}"\npeers = [{hosts}]\nwatchdog = "60s"\n')
    return config


# -- 1. codec ---------------------------------------------------------------------------------


def load_index(db: Path) -> Any:
    from sqlalchemy import create_engine

    from imeisync.adapters.attach_index import build_from_store

    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        index, _ = build_from_store(conn)
    engine.dispose()
    return index


def _patch_python_diameter() -> None:
    """python-diameter 0.9.0 records an answer's Result-Code in its statistics even when the
    answer has none (5422 carries only Experimental-Result): ``int(None / 1000)`` raises and
    the answer's bookkeeping fails. Skip None there."""
    from diameter.node.peer import PeerStats

    original = PeerStats.add_sent_result_code

    def add_sent_result_code(self: Any, result_code: int | None) -> None:
        if result_code is not None:
            original(self, result_code)

    PeerStats.add_sent_result_code = add_sent_result_code  # type: ignore[method-assign]


def pd_answer(msg: Any, index: Any) -> Any:
    """python-diameter's ECA for ``msg`` from ``index`` (the same rule, NOT_FOUND policy)."""
    from diameter.message.avp.grouped import ExperimentalResult
    from diameter.message.commands import MeIdentityCheckAnswer

    from imeisync.domain.verdict import Status

    answer = MeIdentityCheckAnswer()
    answer.header.hop_by_hop_identifier = msg.header.hop_by_hop_identifier
    answer.header.end_to_end_identifier = msg.header.end_to_end_identifier
    answer.header.application_id = c.APP_S13
    answer.session_id = msg.session_id
    answer.auth_session_state = 1
    answer.origin_host = EIR.encode()
    answer.origin_realm = REALM.encode()
    imei = msg.terminal_information.imei
    status = index.lookup(int(imei[:14]), msg.user_name)
    if status is Status.UNKNOWN:
        answer.experimental_result = ExperimentalResult(
            vendor_id=c.VENDOR_3GPP, experimental_result_code=c.EQUIPMENT_UNKNOWN)
    else:
        answer.result_code = c.SUCCESS
        answer.equipment_status = {"WHITELISTED": 0, "BLACKLISTED": 1, "GREYLISTED": 2}[status]
    return answer


def codec_bench(db: Path, queries: list[tuple[int, str]]) -> dict[str, float]:
    from diameter.message import Message

    from imeisync.adapters.diameter.s13 import S13App

    index = load_index(db)
    app = S13App(index.lookup, lambda: True, origin_host=EIR, origin_realm=REALM,
                 unknown_status="NOT_FOUND")
    messages = [make_ecr(key, imsi, n) for n, (key, imsi) in enumerate(queries)]
    ours_out = [app.answer(m, 0, len(m), m[4], n, n) for n, m in enumerate(messages)]
    theirs_out = [pd_answer(Message.from_bytes(m), index).as_bytes() for m in messages]
    same = sum(1 for a, b in zip(ours_out, theirs_out, strict=True)
               if _verdict(a) == _verdict(b))
    best: dict[str, float] = {}
    for name, fn in (("ours", lambda m, n: app.answer(m, 0, len(m), m[4], n, n)),
                     ("python-diameter",
                      lambda m, n: pd_answer(Message.from_bytes(m), index).as_bytes())):
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            for n, m in enumerate(messages):
                fn(m, n)
            runs.append((time.perf_counter() - started) / len(messages) * 1e6)
        best[name] = min(runs)
    best["same_verdicts"] = same / len(messages)
    return best


def _verdict(raw: bytes) -> tuple[int | None, int | None, int | None]:
    avps = c.read_avps(raw, 20, len(raw))
    found: dict[int, int] = {}
    for avp in avps:
        if avp.code in (c.RESULT_CODE, c.EQUIPMENT_STATUS):
            found[avp.code] = avp.u32(raw)
        elif avp.code == c.EXPERIMENTAL_RESULT:
            for inner in c.read_grouped(raw, avp):
                if inner.code == c.EXPERIMENTAL_RESULT_CODE:
                    found[inner.code] = inner.u32(raw)
    return (found.get(c.RESULT_CODE), found.get(c.EQUIPMENT_STATUS),
            found.get(c.EXPERIMENTAL_RESULT_CODE))


# -- servers run by this script -----------------------------------------------------------------


def serve_null(port: int) -> None:
    """Answer every request with the same pre-encoded ECA (hbh/e2e copied): no decoding, no
    lookup. What the load generator can push through loopback at most."""
    body = (c.avp_text(c.SESSION_ID, "x;1") + c.avp_u32(c.RESULT_CODE, c.SUCCESS)
            + c.avp_u32(c.AUTH_SESSION_STATE, 1) + c.avp_text(c.ORIGIN_HOST, EIR)
            + c.avp_text(c.ORIGIN_REALM, REALM)
            + c.avp_u32(c.EQUIPMENT_STATUS, 0, vendor=c.VENDOR_3GPP))
    cea_body = (c.avp_u32(c.RESULT_CODE, c.SUCCESS) + c.avp_text(c.ORIGIN_HOST, EIR)
                + c.avp_text(c.ORIGIN_REALM, REALM))

    class Null(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t, self.buf = transport, b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            off, out = 0, []
            while len(buf) - off >= 20:
                length = int.from_bytes(buf[off + 1:off + 4], "big")
                if len(buf) - off < length:
                    break
                code = int.from_bytes(buf[off + 5:off + 8], "big")
                ids = buf[off + 12:off + 20]
                if code == c.CMD_CER:
                    out.append(c.header(0, c.CMD_CER, 0, 0, 0, len(cea_body))[:12] + ids
                               + cea_body)
                else:
                    out.append(c.header(0, code, c.APP_S13, 0, 0, len(body))[:12] + ids + body)
                off += length
            self.buf = buf[off:]
            if out:
                self.t.write(b"".join(out))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Null, "127.0.0.1", port)
        print("listening", flush=True)
        await server.serve_forever()

    _run(main())


def serve_python_diameter(port: int, db: str, peers: int) -> None:
    from diameter.node import Node
    from diameter.node.application import SimpleThreadingApplication

    _patch_python_diameter()
    index = load_index(Path(db))
    node = Node(EIR, REALM, ip_addresses=["127.0.0.1"], tcp_port=port, vendor_ids=[10415])
    app = SimpleThreadingApplication(c.APP_S13, is_auth_application=True,
                                     request_handler=lambda app, msg: pd_answer(msg, index))
    known = [node.add_peer(f"aaa://{MME.format(n)}:1;transport=tcp", REALM)
             for n in range(1, peers + 1)]
    node.add_application(app, known)
    node.start()
    print("listening", flush=True)
    try:
        while True:
            time.sleep(1)
    finally:
        node.stop(wait_timeout=2, force=True)


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# -- the load generator ---------------------------------------------------------------------------


def load(port: int, peers: int, window: int, duration: float, queries_file: str,
         rate: int = 0) -> None:
    """Keep ``window`` ECRs in flight on each of ``peers`` connections for ``duration`` s, or,
    with ``rate``, send ``rate`` ECRs a second in all (at most ``window`` in flight per peer);
    print JSON: answers/s, p50/p99 in ms, answers by result, errors."""
    queries = [tuple(q) for q in json.loads(Path(queries_file).read_text())]
    requests = [make_ecr(int(key), imsi, n) for n, (key, imsi) in enumerate(queries)]
    size = len(requests)

    class Peer(asyncio.Protocol):
        def __init__(self, host: str, done: asyncio.Future[None]):
            self.host, self.done = host, done
            self.buf = b""
            self.open = False
            self.next = random.randrange(size)
            self.sent = [0.0] * size
            self.latencies: list[float] = []
            self.results: dict[str, int] = {}
            self.stop_at = 0.0
            self.outstanding = 0
            self.errors = 0

        def connection_made(self, transport: Any) -> None:
            self.t = transport
            transport.write(cer(self.host))

        def _send(self, count: int, now: float) -> None:
            chunk = []
            for _ in range(count):
                n = self.next
                self.next = (n + 1) % size
                self.sent[n] = now
                chunk.append(requests[n])
            self.outstanding += count
            self.t.write(b"".join(chunk))

        def data_received(self, data: bytes) -> None:
            now = time.perf_counter()
            buf = self.buf + data if self.buf else data
            off, got = 0, 0
            lat = self.latencies
            while len(buf) - off >= 20:
                length = int.from_bytes(buf[off + 1:off + 4], "big")
                if len(buf) - off < length:
                    break
                hbh = int.from_bytes(buf[off + 12:off + 16], "big")
                if not self.open:
                    self.open = True
                    self.stop_at = now + duration
                    self.started = now
                    if rate:
                        asyncio.get_running_loop().create_task(self.pace())
                    else:
                        self._send(window, now)
                elif buf[off + 4] & 0x80:  # a request from the server (DWR): ignore
                    pass
                else:
                    got += 1
                    lat.append(now - self.sent[hbh])
                    if hbh % 997 == 0:
                        key = str(_verdict(buf[off:off + length]))
                        self.results[key] = self.results.get(key, 0) + 1
                off += length
            self.buf = buf[off:]
            self.outstanding -= got
            if got and now < self.stop_at and not rate:
                self._send(got, now)
            elif self.open and now >= self.stop_at and self.outstanding <= 0 \
                    and not self.done.done():
                self.ended = now
                self.done.set_result(None)

        async def pace(self) -> None:
            """``rate / peers`` ECRs a second, sent about every millisecond (what is owed for
            the time that really passed, so a late wake-up does not lower the rate)."""
            per_s, owed, last = rate / peers, 0.0, time.perf_counter()
            while True:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                owed += (now - last) * per_s
                last = now
                if now >= self.stop_at:
                    if self.outstanding <= 0 and not self.done.done():
                        self.ended = now
                        self.done.set_result(None)
                    if self.done.done():
                        return
                    continue
                count = min(int(owed), window - self.outstanding)
                if count > 0:
                    owed -= count
                    self._send(count, now)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.done.done():
                self.errors += 1
                self.ended = time.perf_counter()
                self.done.set_result(None)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        made = []
        for n in range(1, peers + 1):
            done: asyncio.Future[None] = loop.create_future()
            host = MME.format(n)
            _, proto = await loop.create_connection(functools.partial(Peer, host, done),
                                                    "127.0.0.1", port)
            proto.t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                        socket.TCP_NODELAY, 1)
            made.append((done, proto))
        await asyncio.wait_for(asyncio.gather(*(d for d, _ in made)), duration + 30)
        lat = sorted(x for _, p in made for x in p.latencies)
        spans = [p.ended - p.started for _, p in made if hasattr(p, "started")]
        results: dict[str, int] = {}
        for _, p in made:
            for k, v in p.results.items():
                results[k] = results.get(k, 0) + v
        return {"rps": len(lat) / max(spans) if spans else 0.0,
                "p50_ms": lat[len(lat) // 2] * 1e3 if lat else 0.0,
                "p99_ms": lat[int(len(lat) * 0.99)] * 1e3 if lat else 0.0,
                "answers": len(lat), "errors": sum(p.errors for _, p in made),
                "sampled": results}

    print(json.dumps(_run(main())))


# -- the run ------------------------------------------------------------------------------


def wait_port(port: int, proc: Proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise SystemExit(f"{proc.name} exited:\n{proc.log.read_text()[-3000:]}")
        if proc.name == "s13" and "attach index ready" not in proc.log.read_text():
            time.sleep(0.05)
            continue
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{proc.name} did not listen within {timeout}s")


def run_load(port: int, peers: int, window: int, args: argparse.Namespace,
             queries_file: Path, core: int | None, rate: int = 0) -> dict[str, Any]:
    cmd = pin(core, [sys.executable, str(Path(__file__).resolve()), "load", str(port),
                     str(peers), str(window), str(args.duration), str(queries_file),
                     str(rate)])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 120)
    if out.returncode != 0:
        raise SystemExit(f"load generator failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("load", "null", "pydiam"):
        role, rest = sys.argv[1], sys.argv[2:]
        if role == "load":
            load(int(rest[0]), int(rest[1]), int(rest[2]), float(rest[3]), rest[4],
                 int(rest[5]) if len(rest) > 5 else 0)
        elif role == "null":
            serve_null(int(rest[0]))
        else:
            serve_python_diameter(int(rest[0]), rest[1], int(rest[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", default="1M")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--pin", action="store_true", help="servers on core 0, load on core 1")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--peers", default="1,8")
    parser.add_argument("--outstanding", default="32,64")
    parser.add_argument("--paced", type=int, default=10_000,
                        help="also a paced run at this many ECRs/s in all (0: none)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="s13-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    entries = parse_size(args.entries)
    server_core, load_core = (0, 1) if args.pin else (None, None)
    print(f"S13 benchmark: {entries:,} entries, {args.duration:.0f}s per run, "
          f"{os.cpu_count()} cores{' (pinned)' if args.pin else ''}; workdir {workdir}")
    db, queries = prepare(workdir, entries)
    queries_file = workdir / "s13-queries.json"
    queries_file.write_text(json.dumps(queries))

    print("\n1. codec: one ECR -> ECA in process (decode, verdict, encode), same 20,000 ECRs")
    codec = codec_bench(db, queries)
    print(f"   ours            {codec['ours']:7.2f} µs/message")
    print(f"   python-diameter {codec['python-diameter']:7.2f} µs/message "
          f"({codec['python-diameter'] / codec['ours']:.1f}x ours); same verdicts: "
          f"{codec['same_verdicts']:.0%}")

    peer_counts = [int(p) for p in args.peers.split(",")]
    windows = [int(w) for w in args.outstanding.split(",")]
    eir_port, s13_port, null_port, pd_port = free_port(), free_port(), free_port(), free_port()
    config = write_config(workdir, db, eir_port, s13_port, max(peer_counts))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMEISYNC_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    procs = {
        "s13": Proc("s13", pin(server_core, [sys.executable, "-m", "imeisync.entrypoints.s13",
                                             "--config", str(config)]),
                    workdir / "s13.log", env),
        "h2c": Proc("h2c", pin(server_core, [sys.executable, "-m", "imeisync.entrypoints.eir",
                                             "--config", str(config), "--workers", "1"]),
                    workdir / "eir.log", env),
        "null": Proc("null", pin(server_core, [sys.executable, __file__, "null",
                                               str(null_port)]), workdir / "null.log", env),
        "pydiam": Proc("pydiam", pin(server_core, [sys.executable, __file__, "pydiam",
                                                   str(pd_port), str(db),
                                                   str(max(peer_counts))]),
                       workdir / "pydiam.log", env),
    }
    ports = {"s13": s13_port, "h2c": eir_port, "null": null_port, "pydiam": pd_port}
    results: dict[tuple[str, int, int], dict[str, Any]] = {}
    try:
        for name, proc in procs.items():
            wait_port(ports[name], proc)
        uris = workdir / "uris.txt"
        uris.write_text("\n".join(
            f"http://127.0.0.1:{eir_port}/n5g-eir-eic/v1/equipment-status?pei=imei-{k:014d}0"
            f"&supi=imsi-{imsi}" for k, imsi in queries) + "\n")
        print("\n2. over loopback TCP (answers/s; latency from the load generator)")
        print("   (h2c 'errors' are h2load's non-2xx count: the 404 ERROR_EQUIPMENT_UNKNOWN "
              "answers for the unknown half, as NOT_FOUND asks)")
        print(f"   {'target':7} {'peers':>5} {'out':>4} {'answers/s':>10} {'p50 ms':>7} "
              f"{'p99 ms':>7} {'errors':>6}")
        for peers in peer_counts:
            for window in windows:
                for name in ("null", "s13", "h2c", "pydiam"):
                    if name == "pydiam" and window != windows[0]:
                        continue
                    if name == "h2c":
                        r = _h2load_window(eir_port, uris, peers, window, args, load_core,
                                           workdir)
                    else:
                        r = run_load(ports[name], peers, window, args, queries_file, load_core)
                    results[(name, peers, window)] = r
                    print(f"   {name:7} {peers:>5} {window:>4} {r['rps']:>10,.0f} "
                          f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r.get('errors', 0):>6}",
                          flush=True)
        if args.paced:
            peers, window = max(peer_counts), 32
            for name in ("null", "s13", "h2c"):
                if name == "h2c":
                    r = _h2load_window(eir_port, uris, peers, window, args, load_core,
                                       workdir, rate=args.paced)
                else:
                    r = run_load(ports[name], peers, window, args, queries_file, load_core,
                                 rate=args.paced)
                results[(name + " paced", peers, window)] = r
                print(f"   {name + ' @' + format(args.paced, ','):15} {peers:>2} {window:>4} "
                      f"{r['rps']:>10,.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                      f"{r.get('errors', 0):>6}", flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
    summary(codec, results, peer_counts, windows)
    for name in ("s13", "null", "h2c"):
        paced = results.get((name + " paced", max(peer_counts), 32))
        if paced:
            r = paced
            print(f"   paced at {args.paced:,}/s over {max(peer_counts)} peers: {name} p50 "
                  f"{r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def _h2load_window(port: int, uris: Path, peers: int, window: int, args: argparse.Namespace,
                   core: int | None, workdir: Path, rate: int = 0) -> dict[str, Any]:
    """h2load with ``window`` concurrent streams per connection (the same outstanding count)."""
    import attach_http

    real = attach_http.sh

    def with_window(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        cmd = [f"-m{window}" if part == "-m1" else part for part in cmd]
        return real(cmd, **kw)

    attach_http.sh = with_window
    try:
        return attach_http.run_h2load(port, uris, argparse.Namespace(
            connections=peers, duration=int(args.duration)), core, workdir, rate=rate)
    finally:
        attach_http.sh = real


def summary(codec: dict[str, float], results: dict[tuple[str, int, int], dict[str, Any]],
            peer_counts: list[int], windows: list[int]) -> None:
    print("\nsummary (the machine is shared with other work: figures are indicative)")
    print(f"   codec: python-diameter costs {codec['python-diameter'] / codec['ours']:.1f}x "
          "our ECR->ECA path")
    for peers in peer_counts:
        for window in windows:
            s13 = results[("s13", peers, window)]
            h2c = results[("h2c", peers, window)]
            null = results[("null", peers, window)]
            line = (f"   {peers} peer(s), {window} outstanding: S13 {s13['rps']:,.0f}/s = "
                    f"{s13['rps'] / max(h2c['rps'], 1):.2f}x h2c (target >= 1), "
                    f"{s13['rps'] / max(null['rps'], 1):.0%} of the generator's ceiling "
                    f"({null['rps']:,.0f}/s)")
            pd = results.get(("pydiam", peers, window))
            if pd:
                line += f", {s13['rps'] / max(pd['rps'], 1):.1f}x python-diameter (target >= 10)"
            print(line)
            if window == 32:
                ok = "met" if s13["p99_ms"] <= TARGET_P99_MS else "NOT met"
                print(f"      p99 at 32 outstanding: {s13['p99_ms']:.2f} ms "
                      f"(target <= {TARGET_P99_MS} ms: {ok})")


if __name__ == "__main__":
    main()
