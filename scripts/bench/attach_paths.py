#!/usr/bin/env python3
"""Which server path serves the attach check fastest: imeisync vs nginx, h2c and HTTP/1.1.

Not a test; run it through ``attach_http.sh --paths`` (which installs h2load and nginx).

Every configuration serves the same N5g-eir app (``eir.create_app``) over the same in-memory
index (``--entries`` TAC-clustered IMEIs built from a fixed seed in each worker, behind the
daemon's own ``KeeperLookup``), one Granian worker, started through ``granian_server.build``:

* ``asgi/asyncio``            -- the app behind a thin ASGI adapter, asyncio loop and tasks
                                 (the shape the attach check had before RSGI);
* ``rsgi/asyncio``            -- Granian's RSGI interface alone;
* ``asgi/uvloop``             -- uvloop alone;
* ``rsgi/uvloop``             -- both;
* ``rsgi/uvloop/rust``        -- both plus Granian's Rust task implementation: what imeisync
                                 runs (``granian_server.server_path``);
* ``constant``                -- a constant answer on the same path: the server's own ceiling.

nginx (one worker, a constant JSON body) is the reference. For each repetition and protocol,
every configuration runs right after its own nginx run, so each pair shares the machine's load
of that moment; the ratio reported is the median of the per-pair ratios. h2load drives both
protocols (``--h1`` for HTTP/1.1): ``-n`` requests over ``-c 32`` connections, ``-m`` streams per
h2c connection (``h2c``), or one (``h2c1``, like ``h1``: 32 requests outstanding), cycling
through 20,000 different pei/supi queries (half of them listed);
with 2+ cores the servers run on core 0 and h2load on core 1 (``taskset``). Latency p50/p99
come from h2load's per-request log; CPU microseconds per request from the server processes'
``utime + stime`` (``/proc``) before and after each run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))

EIC = "/n5g-eir-eic/v1/equipment-status"
QUERIES = 20_000
CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    # name: (factory in this module, Granian options over granian_server.build(fast=True))
    "asgi/asyncio": ("asgi_app", {"interface": "asgi", "loop": "asyncio",
                                  "task_impl": "asyncio"}),
    "rsgi/asyncio": ("rsgi_app", {"loop": "asyncio", "task_impl": "asyncio"}),
    "asgi/uvloop": ("asgi_app", {"interface": "asgi", "loop": "uvloop", "task_impl": "asyncio"}),
    "rsgi/uvloop": ("rsgi_app", {"loop": "uvloop", "task_impl": "asyncio"}),
    "rsgi/uvloop/rust": ("rsgi_app", {}),
    "constant": ("constant_app", {}),
}


# -- the apps (imported by Granian's worker) ------------------------------------------------


class _Keeper:
    """An ``IndexKeeper`` stand-in holding the synthetic index (same ``KeeperLookup`` path)."""

    def __init__(self) -> None:
        from benchdata import clustered_index

        from imeisync.adapters.attach_index import AttachIndex

        data = clustered_index(int(os.environ.get("IMEISYNC_BENCH_ENTRIES", "1000000")),
                               probes=QUERIES // 2)
        self.index = AttachIndex(data.blocked, data.tracked, {}, seq=1)

    def health(self) -> dict[str, Any]:
        return {"ready": True, "database_reachable": True, "source": "bench",
                **self.index.counts()}

    def stop(self) -> None:
        pass


def rsgi_app() -> Any:
    from imeisync.entrypoints.admission import Admission
    from imeisync.entrypoints.eir import KeeperLookup, create_app

    # capacity, not admission control (attach_overload.py): h2load is one client address
    return create_app(KeeperLookup(_Keeper()), admission=Admission(1 << 30, 1.0))


def asgi_app() -> Any:
    """The same app behind an ASGI adapter whose headers are encoded once per answer shape."""
    handler = rsgi_app().__rsgi__
    encoded: dict[int, list[tuple[bytes, bytes]]] = {}

    class Scope:
        __slots__ = ("client", "method", "path", "query_string")

    class Proto:
        __slots__ = ("answer",)

        def response_bytes(self, status: int, headers: list[tuple[str, str]],
                           body: bytes) -> None:
            self.answer = (status, headers, body)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        rsgi_scope, proto = Scope(), Proto()
        rsgi_scope.method, rsgi_scope.path = scope["method"], scope["path"]
        rsgi_scope.client = "{}:{}".format(*(scope.get("client") or ("", 0)))
        rsgi_scope.query_string = scope["query_string"].decode("latin-1")
        await handler(rsgi_scope, proto)
        status, headers, body = proto.answer
        raw = encoded.get(id(headers))
        if raw is None:
            raw = encoded[id(headers)] = [(k.encode(), v.encode()) for k, v in headers]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return app


def constant_app() -> Any:
    body = b'{"status":"WHITELISTED"}'
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]

    class App:
        async def __rsgi__(self, scope: Any, proto: Any) -> None:
            proto.response_bytes(200, headers, body)

    return App()


def serve(config: str, port: int) -> None:
    from granian.constants import Interfaces, Loops, TaskImpl

    from imeisync.entrypoints.granian_server import build

    factory, options = CONFIGS[config]
    typed: dict[str, Any] = {}
    for name, value in options.items():
        kind = {"interface": Interfaces, "loop": Loops, "task_impl": TaskImpl}[name]
        typed[name] = kind(value)
    build(f"attach_paths:{factory}", "127.0.0.1", port, fast=True, **typed).serve()


# -- orchestration --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(core: int | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if core is not None and shutil.which("taskset") \
        else cmd


def cpu_seconds(pgid: int) -> float:
    """utime + stime of every process in the process group (Granian master and worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 (pgrp), counted after "pid (comm)"
                total += int(fields[11]) + int(fields[12])
    return total / tick


class Server:
    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str]):
        self.name = name
        self.log = log
        with open(log, "wb") as handle:
            self.proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait(self, url: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.05)
        raise SystemExit(f"{self.name} did not answer within {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def h2load(port: int, uris: Path, args: argparse.Namespace, core: int | None, work: Path,
           server: Server, *, h1: bool, streams: int = 1) -> dict[str, Any]:
    log = work / f"h2load-{os.getpid()}.log"
    lines = uris.read_text().splitlines()  # the first URI names host and port
    lines[0] = f"http://127.0.0.1:{port}/" + lines[0].split("/", 3)[3]
    uris.write_text("\n".join(lines) + "\n")
    cmd = pin(core, ["h2load", "-t1", f"-n{args.requests}", f"-c{args.connections}",
                     f"-m{streams}", *(["--h1"] if h1 else []),
                     "-i", str(uris), f"--log-file={log}"])
    cpu0 = cpu_seconds(server.proc.pid)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(server.proc.pid) - cpu0
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    req = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    micros = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines()
                    if line.count("\t") >= 2)
    log.unlink()
    done = int(req.group(1)) if req else args.requests
    return {"rps": rps, "p50_ms": micros[len(micros) // 2] / 1000,
            "p99_ms": micros[int(len(micros) * 0.99)] / 1000,
            "cpu_us": cpu / max(1, done) * 1e6,
            "errors": int(req.group(2)) + int(req.group(3)) if req else -1,
            "cmd": shlex.join(cmd)}


NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  http2_max_requests 100000000;
  http2_max_concurrent_streams 128;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  server {{
    listen 127.0.0.1:{h1};
    listen 127.0.0.1:{h2} http2;
    location / {{ default_type application/json; return 200 '{{"status":"WHITELISTED"}}'; }}
  }}
}}
"""


def queries(entries: int) -> list[str]:
    from benchdata import clustered_index

    data = clustered_index(entries, probes=QUERIES // 2)
    rng = random.Random(3)
    out = []
    for i, key in enumerate(data.present[:QUERIES // 2] + data.absent[:QUERIES // 2]):
        pei = f"imeisv-{key:014d}{i % 100:02d}" if i % 2 else f"imei-{key:014d}0"
        out.append(f"{EIC}?pei={pei}&supi=imsi-23801{rng.randrange(10**10):010d}")
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200_000, help="h2load -n per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--streams", type=int, default=10, help="h2load -m for h2c")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--protocols", default="h2c,h2c1,h1",
                        help="h2c: -m STREAMS per connection (throughput); h2c1: one stream "
                             "per connection (latency at 32 outstanding); h1: HTTP/1.1")
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place them")
    parser.add_argument("--workdir", default="/tmp/imeisync-bench-paths")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(sorted(unknown))}")
    protocols = [p for p in args.protocols.split(",") if p]
    work = Path(args.workdir)
    (work / "nginx" / "tmp").mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    server_core, load_core = (0, 1) if cores >= 2 and not args.no_pin else (None, None)
    from imeisync.entrypoints.granian_server import server_path

    print(f"# {shlex.join([sys.executable, *sys.argv])}")
    print(f"# Python {sys.version.split()[0]}, {cores} cores, load average "
          f"{os.getloadavg()[0]:.1f}; servers on core {server_core}, h2load on core {load_core};"
          f" imeisync's path here: {server_path().describe()}")
    uris = work / "uris.txt"
    uris.write_text("\n".join(f"http://127.0.0.1:0{q}" for q in queries(args.entries)) + "\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{HERE}",
           "IMEISYNC_BENCH_ENTRIES": str(args.entries)}
    h1_port, h2_port = free_port(), free_port()
    (work / "nginx" / "nginx.conf").write_text(
        NGINX_CONF.format(dir=work / "nginx", h1=h1_port, h2=h2_port))
    servers: dict[str, tuple[Server, int, int]] = {}
    try:
        nginx = Server("nginx", pin(server_core, ["nginx", "-c", str(work / "nginx/nginx.conf"),
                                                  "-p", str(work / "nginx")]),
                       work / "nginx.log", env)
        nginx.wait(f"http://127.0.0.1:{h1_port}/")
        servers["nginx"] = (nginx, h1_port, h2_port)
        for name in configs:
            port = free_port()
            srv = Server(name, pin(server_core, [sys.executable, str(HERE / "attach_paths.py"),
                                                 "--serve", name, str(port)]),
                         work / f"{name.replace('/', '-')}.log", env)
            srv.wait(f"http://127.0.0.1:{port}/healthz" if name != "constant" else
                     f"http://127.0.0.1:{port}/")
            servers[name] = (srv, port, port)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for srv, _p1, p2 in servers.values():  # warm-up
            h2load(p2, uris, argparse.Namespace(**{**vars(args), "requests": 20_000}),
                   load_core, work, srv, h1=False, streams=args.streams)
        for rep in range(args.reps):
            for proto in protocols:
                for name in configs:
                    for target in ("nginx", name):
                        srv, p1, p2 = servers[target]
                        r = h2load(p1 if proto == "h1" else p2, uris, args, load_core, work,
                                   srv, h1=proto == "h1",
                                   streams=args.streams if proto == "h2c" else 1)
                        runs.setdefault((target, proto), []).append(r)
                        runs.setdefault((f"nginx~{name}" if target == "nginx" else target,
                                         proto + "~pair"), []).append(r)
                        print(f"rep {rep + 1} {proto:3} {target:17} {r['rps']:>9,.0f} req/s "
                              f"p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
                              f"{r['cpu_us']:.1f} CPU µs/req errors {r['errors']}", flush=True)
        report(runs, configs, protocols)
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {cores} cores "
              f"(the machine was shared with other jobs: compare ratios, not absolutes)")
    finally:
        for srv, _, _ in reversed(servers.values()):
            srv.stop()


def report(runs: dict[tuple[str, str], list[dict[str, Any]]], configs: list[str],
           protocols: list[str]) -> None:
    print("\n== medians of the reps (ratio: median of the per-pair ratios to nginx)")
    print(f"{'proto':5} {'server':17} {'req/s':>9} {'ratio':>6} {'per-pair ratios':>20} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>10}")
    for proto in protocols:
        for name in ["nginx", *configs]:
            mine = runs[(name, proto)]
            med = {k: statistics.median(r[k] for r in mine)
                   for k in ("rps", "p50_ms", "p99_ms", "cpu_us")}
            ratio, pairs = "", ""
            if name != "nginx":
                ref = runs[(f"nginx~{name}", proto + "~pair")]
                ratios = [a["rps"] / b["rps"] for a, b in zip(mine, ref, strict=True)]
                ratio = f"{statistics.median(ratios):.2f}"
                pairs = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"{proto:5} {name:17} {med['rps']:>9,.0f} {ratio:>6} {pairs:>20} "
                  f"{med['p50_ms']:>7.2f} {med['p99_ms']:>7.2f} {med['cpu_us']:>10.1f}")
    print("\n== command lines (last run of each)")
    for (name, proto), r in runs.items():
        if "~" not in proto:
            print(f"{proto} {name}: {r[-1]['cmd']}")


if __name__ == "__main__":
    main()
