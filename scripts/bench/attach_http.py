#!/usr/bin/env python3
"""Over-HTTP benchmark of the attach check (not a test); run it through attach_http.sh.

Three servers on 127.0.0.1, all with one worker, in the same run:

* ``eir``   -- imeisync's attach check (python -m imeisync.entrypoints.eir) holding N entries
               (default 10M TAC-clustered IMEIs) in its in-memory index;
* ``sql``   -- the same RSGI app and Granian settings, but each request answered by one indexed
               SQL query on the same SQLite store (how PyHSS and Open5GS's EIR answer);
* ``nginx`` -- nginx returning a constant JSON body: the ceiling on this machine.

Each is loaded with wrk (HTTP/1.1) and h2load (h2c, prior knowledge), 32 connections, one
load-generator thread, cycling through 20,000 different pei/supi queries (half of them listed).
With ``--pin`` (2+ cores) the servers run on core 0 and the load generator on core 1. Every
(target, protocol) pair runs ``--reps`` times interleaved; the median run is reported.
Also measured: the first start (index built from the store) and a restart (index loaded from
the persisted file), each until the first answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
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
TARGET_H1_RATIO = 0.35
TARGET_H2_RATIO = 0.8
TARGET_P99_MS = 2.0
TARGET_RESTART_S = 10.0
QUERIES = 20_000  # distinct pei/supi queries cycled through: half listed, half not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * factor)


# -- the SQL-per-request variant (imported by Granian's worker) -------------------------


class SqlLookup:
    """One indexed query per attach check (the partial index on open records, imei_key first)."""

    ready = True

    def __init__(self, path: str):
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.path = path

    def lookup(self, key: int, imsi: str | None):
        from imeisync.domain.verdict import verdict

        text = f"{key:014d}"
        kinds = {row[0] for row in self.conn.execute(
            "SELECT kind FROM records WHERE imei_key = ? AND closed_at IS NULL", (text,))}
        excepted = False
        if imsi is not None and "block" in kinds:
            excepted = self.conn.execute(
                "SELECT 1 FROM exceptions WHERE imei_key = ? AND imsi = ? AND removed_at IS NULL",
                (text, imsi)).fetchone() is not None
        return verdict(blocked="block" in kinds, tracked="track" in kinds, excepted=excepted)

    def health(self) -> dict[str, Any]:
        return {"ready": True, "database_reachable": True, "source": "sql"}

    def stop(self) -> None:
        self.conn.close()


def sql_app():  # Granian factory
    from imeisync.entrypoints.admission import Admission
    from imeisync.entrypoints.eir import create_app

    return create_app(SqlLookup(os.environ["IMEISYNC_BENCH_SQLITE"]),
                      admission=Admission(1 << 30, 1.0))  # capacity, as write_config


# -- orchestration -----------------------------------------------------------------------


def sh(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kwargs)


def pin(core: int | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if core is not None and shutil.which("taskset") \
        else cmd


class Proc:
    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.cmd, self.log = name, cmd, log
        self.started = time.monotonic()
        with open(log, "wb") as handle:
            self.proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_answer(url: str, proc: Proc, timeout: float = 900) -> float:
    """Seconds from the process start until ``url`` answered 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise SystemExit(f"{proc.name} exited:\n{proc.log.read_text()[-3000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return time.monotonic() - proc.started
        time.sleep(0.02)
    raise SystemExit(f"{proc.name} did not answer within {timeout}s")


def prepare_store(workdir: Path, entries: int) -> tuple[Path, list[str]]:
    """The SQLite store with ``entries`` open records (reused when already there)."""
    from benchdata import clustered_index, fill_sqlite

    db = workdir / "store.db"
    marker = workdir / "store.json"
    queries_file = workdir / "queries.json"
    stored = json.loads(marker.read_text()) if marker.exists() and db.exists() else {}
    if stored.get("n") == entries and stored.get("queries") == QUERIES:
        print(f"store: reusing {db} ({entries:,} entries)")
        return db, json.loads(queries_file.read_text())
    data = clustered_index(entries, probes=QUERIES // 2)  # deterministic: same seed, same keys
    if stored.get("n") == entries:
        print(f"store: reusing {db} ({entries:,} entries)")
    else:
        for old in workdir.glob("store.db*"):
            old.unlink()
        seconds = fill_sqlite(db, data)
        print(f"store: {entries:,} records written to {db} in {seconds:.0f}s")
    rng = random.Random(3)
    queries = []
    half = QUERIES // 2
    for i, key in enumerate(data.present[:half] + data.absent[:half]):
        form = i % 3
        pei = (f"imeisv-{key:014d}{i % 100:02d}" if form == 0 else
               f"imei-{key:014d}0" if form == 1 else f"imei-{key:014d}{i % 10}")
        supi = f"&supi=imsi-23801{rng.randrange(10**10):010d}"
        queries.append(f"{EIC}?pei={pei}{supi}")
    rng.shuffle(queries)
    queries_file.write_text(json.dumps(queries))
    marker.write_text(json.dumps({"n": entries, "queries": QUERIES}))
    return db, queries


def write_config(workdir: Path, db: Path, port: int) -> Path:
    config = workdir / "imeisync.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///{db}"\n'
        f'[eir]\nlisten = "127.0.0.1:{port}"\nworkers = 1\n'
        f'index_file = "{workdir / "attach-index.bin"}"\n'
        # capacity, not admission control (attach_overload.py measures that): h2load's one
        # address would otherwise be held to its per_client_share
        'max_inflight = 1000000000\nper_client_share = 1.0\n'
    )
    return config


NGINX_CONF = """worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  http2_max_requests 100000000;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
  server {{
    listen 127.0.0.1:{h1};
    listen 127.0.0.1:{h2} http2;
    location / {{ default_type application/json; return 200 '{{"status":"WHITELISTED"}}'; }}
  }}
}}
"""

WRK_LUA = """
local paths = {{}}
for line in io.lines("{file}") do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""


def run_wrk(port: int, lua: Path, args: argparse.Namespace, core: int | None) -> dict[str, Any]:
    cmd = pin(core, ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency",
                     "-s", str(lua), f"http://127.0.0.1:{port}/"])
    out = sh(cmd).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+\w+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {"rps": rps, "p50_ms": _ms(lat["50"]), "p99_ms": _ms(lat["99"]),
            "errors": int(errors.group(1)) if errors else 0, "socket": sock.group(1) if sock
            else "", "cmd": shlex.join(cmd)}


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_h2load(port: int, uris: Path, args: argparse.Namespace, core: int | None,
               workdir: Path, *, h1: bool = False, rate: int = 0) -> dict[str, Any]:
    """h2load: h2c with prior knowledge, or HTTP/1.1 (``h1``); paced at ``rate`` req/s in all
    when given (``--rps`` per connection), else as fast as the server answers."""
    log = workdir / "h2load.log"
    extra = (["--h1"] if h1 else []) + (
        [f"--rps={max(1, rate // args.connections)}"] if rate else [])
    cmd = pin(core, ["h2load", "-t1", f"-c{args.connections}", "-m1", f"-D{args.duration}",
                     *extra, "-i", str(uris), f"--log-file={log}"])
    lines = uris.read_text().splitlines()  # the first URI names host and port
    lines[0] = f"http://127.0.0.1:{port}{_path(lines[0])}"
    uris.write_text("\n".join(lines) + "\n")
    out = sh(cmd).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
    req = re.search(r"requests: (\d+) total.*?(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    micros = []
    with open(log) as handle:
        for line in handle:
            parts = line.split("\t")
            if len(parts) >= 3:
                micros.append(int(parts[2]))
    log.unlink()
    micros.sort()
    return {"rps": rps, "p50_ms": micros[len(micros) // 2] / 1000 if micros else 0.0,
            "p99_ms": micros[int(len(micros) * 0.99)] / 1000 if micros else 0.0,
            "errors": int(req.group(3)) + int(req.group(4)) if req else -1, "cmd": shlex.join(cmd)}


def _path(uri: str) -> str:
    return "/" + uri.split("/", 3)[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", default="10M")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/imeisync-bench-http")
    parser.add_argument("--pin", action="store_true",
                        help="pin the servers to core 0 and the load generator to core 1 "
                             "(cleaner on an idle machine; on a shared one it starves Granian's "
                             "thread hand-offs, so the default lets the scheduler place them)")
    parser.add_argument("--paced-rate", type=int, default=10_000,
                        help="also measure latency at this fixed total rate (a national "
                             "operator's peak; 0 to skip)")
    args = parser.parse_args()
    entries = parse_size(args.entries)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    server_core, load_core = (0, 1) if cores >= 2 and args.pin else (None, None)
    print(f"# {shlex.join([sys.executable, *sys.argv])}")
    print(f"# {cores} cores; servers on core {server_core}, load generator on core {load_core}; "
          f"{args.connections} connections, {args.duration}s per run, {args.reps} reps")

    load0 = f"{os.getloadavg()[0]:.1f}"
    db, queries = prepare_store(workdir, entries)
    eir_port, sql_port, h1_port, h2_port = (free_port() for _ in range(4))
    config = write_config(workdir, db, eir_port)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{HERE}", "IMEISYNC_BENCH_SQLITE": str(db)}
    env.pop("IMEISYNC_CONFIG", None)
    python = sys.executable
    eir_cmd = pin(server_core, [python, "-m", "imeisync.entrypoints.eir", "--config", str(config),
                                "--workers", "1"])
    probe = f"http://127.0.0.1:{eir_port}{queries[0]}"
    procs: list[Proc] = []
    try:
        index_file = workdir / "attach-index.bin"
        if index_file.exists():
            index_file.unlink()
        first = Proc("eir (build)", eir_cmd, workdir / "eir-build.log", env)
        build_s = wait_answer(probe, first)
        first.stop()
        eir = Proc("eir", eir_cmd, workdir / "eir.log", env)
        procs.append(eir)
        restart_s = wait_answer(probe, eir)
        print(f"eir first start (index built from the store): {build_s:.1f}s to first answer")
        print(f"eir restart (persisted index {index_file.stat().st_size / 1e6:.1f} MB): "
              f"{restart_s:.2f}s to first answer (target ≤ {TARGET_RESTART_S:.0f}s)")
        print(f"  command: {shlex.join(eir_cmd)}")
        health = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{eir_port}/healthz").read())["attach_index"]
        print(f"  index: {health['entries']:,} entries at seq {health['seq']}")

        visible = visibility(config, eir_port, env)
        print(f"order accepted by another process (imeisync order block) answered BLACKLISTED "
              f"after {', '.join(f'{v * 1000:.0f}' for v in visible)} ms (target ≤ 1000 ms)")

        sql_cmd = pin(server_core, [python, str(HERE / "attach_http.py"), "--serve-sql",
                                    str(config), str(sql_port)])
        sql = Proc("sql", sql_cmd, workdir / "sql.log", env)
        procs.append(sql)
        wait_answer(f"http://127.0.0.1:{sql_port}{queries[0]}", sql)
        (workdir / "nginx" / "tmp").mkdir(parents=True, exist_ok=True)
        nginx_conf = workdir / "nginx" / "nginx.conf"
        nginx_conf.write_text(NGINX_CONF.format(dir=workdir / "nginx", h1=h1_port, h2=h2_port))
        nginx_cmd = pin(server_core, ["nginx", "-c", str(nginx_conf), "-p",
                                      str(workdir / "nginx")])
        nginx = Proc("nginx", nginx_cmd, workdir / "nginx.log")
        procs.append(nginx)
        wait_answer(f"http://127.0.0.1:{h1_port}{queries[0]}", nginx, timeout=10)
        for name, port in (("eir", eir_port), ("sql", sql_port)):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}{queries[0]}").read()
            print(f"  {name} answers {body.decode()} for {queries[0][:70]}…")

        paths_file = workdir / "paths.txt"
        paths_file.write_text("\n".join(queries) + "\n")
        lua = workdir / "paths.lua"
        lua.write_text(WRK_LUA.format(file=paths_file))
        uris = workdir / "uris.txt"
        uris.write_text("\n".join(f"http://127.0.0.1:0{q}" for q in queries) + "\n")

        targets = {"nginx": (h1_port, h2_port), "eir": (eir_port, eir_port),
                   "sql": (sql_port, sql_port)}
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for p1, _p2 in targets.values():  # warm-up
            sh(pin(load_core, ["wrk", "-t1", f"-c{args.connections}", "-d2s", "-s", str(lua),
                               f"http://127.0.0.1:{p1}/"]))
        for rep in range(args.reps):
            for name, (p1, p2) in targets.items():
                h1 = run_wrk(p1, lua, args, load_core)
                h2 = run_h2load(p2, uris, args, load_core, workdir)
                runs.setdefault((name, "h1"), []).append(h1)
                runs.setdefault((name, "h2c"), []).append(h2)
                print(f"rep {rep + 1} {name:5}: HTTP/1.1 {h1['rps']:>9,.0f} req/s p99 "
                      f"{h1['p99_ms']:.2f} ms | h2c {h2['rps']:>9,.0f} req/s p99 "
                      f"{h2['p99_ms']:.2f} ms", flush=True)
        if args.paced_rate:
            for rep in range(args.reps):
                for name in ("eir", "nginx"):
                    p1, p2 = targets[name]
                    for proto, port, h1 in (("h1 paced", p1, True), ("h2c paced", p2, False)):
                        r = run_h2load(port, uris, args, load_core, workdir, h1=h1,
                                       rate=args.paced_rate)
                        runs.setdefault((name, proto), []).append(r)
                        print(f"rep {rep + 1} {name:5}: {proto} at {args.paced_rate:,}/s: "
                              f"{r['rps']:,.0f} req/s p50 {r['p50_ms']:.2f} ms p99 "
                              f"{r['p99_ms']:.2f} ms", flush=True)
        report(runs, restart_s, build_s, entries, args.paced_rate)
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} (1 min), "
              f"{os.getloadavg()[2]:.1f} (15 min) on {cores} cores; at the start: {load0}")
    finally:
        for proc in reversed(procs):
            proc.stop()


def visibility(config: Path, port: int, env: dict[str, str], times: int = 5) -> list[float]:
    """Seconds from ``imeisync order block`` returning to the attach check answering it."""
    from imeisync.domain.imei import luhn_check_digit

    rng = random.Random()
    seconds = []
    for _ in range(times):
        key = f"{rng.randrange(10**13, 10**14):014d}"
        imei = key + luhn_check_digit(key)
        sh([sys.executable, "-c", "from imeisync.entrypoints.cli import main; main()",
            "--config", str(config), "order", "block", "--imei", imei, "--case", "BENCH",
            "--unit", "bench"], env=env)
        accepted = time.monotonic()
        url = f"http://127.0.0.1:{port}{EIC}?pei=imei-{imei}"
        while b"BLACKLISTED" not in urllib.request.urlopen(url).read():
            if time.monotonic() - accepted > 10:
                raise SystemExit(f"order for {imei} not visible after 10 s")
            time.sleep(0.005)
        seconds.append(time.monotonic() - accepted)
    return seconds


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["rps"])
    return ordered[len(ordered) // 2]


def report(runs: dict[tuple[str, str], list[dict[str, Any]]], restart_s: float,
           build_s: float, entries: int, paced_rate: int) -> None:
    m = {k: median_run(v) for k, v in runs.items()}
    print("\n== figures (median of the reps)")
    print(f"{'target':8} {'proto':6} {'req/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}  "
          f"all reps req/s")
    for (name, proto), r in m.items():
        every = ", ".join(f"{x['rps']:,.0f}" for x in runs[(name, proto)])
        print(f"{name:8} {proto:6} {r['rps']:>10,.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
              f"{r['errors']:>6}  {every}")
    h1 = m[("eir", "h1")]["rps"] / m[("nginx", "h1")]["rps"]
    h2_own = m[("eir", "h2c")]["rps"] / m[("eir", "h1")]["rps"]
    h2_nginx = m[("eir", "h2c")]["rps"] / m[("nginx", "h2c")]["rps"]
    sql_h1 = m[("eir", "h1")]["rps"] / m[("sql", "h1")]["rps"]
    sql_h2 = m[("eir", "h2c")]["rps"] / m[("sql", "h2c")]["rps"]
    p99 = m[("eir", "h1")]["p99_ms"]
    p99_h2 = m[("eir", "h2c")]["p99_ms"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def paired(a: tuple[str, str], b: tuple[str, str]) -> str:
        """Median of the per-rep ratios: each pair ran back to back, so it shares the load."""
        ratios = sorted(x["rps"] / y["rps"] for x, y in zip(runs[a], runs[b], strict=True))
        return f"per-rep {', '.join(f'{r:.2f}' for r in ratios)}, median " \
               f"{ratios[len(ratios) // 2]:.2f}"

    print("\n== ratios and targets")
    print(f"paired eir/nginx HTTP/1.1: {paired(('eir', 'h1'), ('nginx', 'h1'))}")
    print(f"paired eir h2c/eir HTTP/1.1: {paired(('eir', 'h2c'), ('eir', 'h1'))}")
    print(f"paired eir/sql HTTP/1.1: {paired(('eir', 'h1'), ('sql', 'h1'))}; "
          f"h2c: {paired(('eir', 'h2c'), ('sql', 'h2c'))}")
    print(f"eir HTTP/1.1 / nginx HTTP/1.1: {h1:.2f} (target ≥ {TARGET_H1_RATIO}: "
          f"{verdict(h1 >= TARGET_H1_RATIO)})")
    print(f"eir h2c / eir HTTP/1.1:        {h2_own:.2f} (target ≥ {TARGET_H2_RATIO}: "
          f"{verdict(h2_own >= TARGET_H2_RATIO)})")
    print(f"eir h2c / nginx h2c:           {h2_nginx:.2f}")
    print(f"eir p99 at 32 connections, saturated: HTTP/1.1 {p99:.2f} ms, h2c {p99_h2:.2f} ms "
          f"(target ≤ {TARGET_P99_MS} ms: {verdict(max(p99, p99_h2) <= TARGET_P99_MS)})")
    if ("eir", "h1 paced") in m:
        a, b = m[("eir", "h1 paced")]["p99_ms"], m[("eir", "h2c paced")]["p99_ms"]
        print(f"eir p99 at {paced_rate:,} req/s paced: HTTP/1.1 {a:.2f} ms, h2c {b:.2f} ms "
              f"(target ≤ {TARGET_P99_MS} ms: {verdict(max(a, b) <= TARGET_P99_MS)}); nginx "
              f"{m[('nginx', 'h1 paced')]['p99_ms']:.2f} / "
              f"{m[('nginx', 'h2c paced')]['p99_ms']:.2f} ms")
    print(f"index vs one SQL query per request: {sql_h1:.2f}x (HTTP/1.1), {sql_h2:.2f}x (h2c)")
    print(f"restart to first answer at {entries / 1e6:g}M entries: {restart_s:.2f}s "
          f"(target ≤ {TARGET_RESTART_S:.0f}s: {verdict(restart_s <= TARGET_RESTART_S)}); "
          f"first start building from the store: {build_s:.1f}s")
    print("\n== command lines (median run)")
    for (name, proto), r in m.items():
        print(f"{name} {proto}: {r['cmd']}")


def serve_sql(config_path: str, port: str) -> None:
    from imeisync.config import load_config
    from imeisync.entrypoints.eir import server

    server(load_config(config_path), listen=f"127.0.0.1:{port}", workers=1,
           target="attach_http:sql_app").serve()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-sql":
        serve_sql(sys.argv[2], sys.argv[3])
    else:
        main()
