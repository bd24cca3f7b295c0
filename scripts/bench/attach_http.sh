#!/usr/bin/env bash
# Attach check over HTTP: imeisync (10M entries, one worker) vs nginx returning a constant body
# vs one SQL query per request; wrk (HTTP/1.1) and h2load (h2c), 32 connections, loopback only.
#
#   scripts/bench/attach_http.sh [--entries 10M] [--duration 10] [--reps 3] [--workdir DIR]
#
# With --paths first: which server path serves the attach check fastest (ASGI vs RSGI, asyncio
# vs uvloop, asyncio vs Rust tasks) against nginx, h2c and HTTP/1.1 (attach_paths.py):
#
#   scripts/bench/attach_http.sh --paths [--entries 1000000] [--requests 200000] [--reps 3]
#
# Installs wrk, nghttp2-client (h2load) and nginx from Debian packages when missing (needs root
# or sudo). The store and its 10M records are kept in the workdir and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if ((${#missing[@]})); then
    echo "installing ${missing[*]} from Debian packages" >&2
    sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update
    $sudo_ apt-get install -y "${missing[@]}"
fi
export PATH="$PATH:/usr/sbin"

python=.venv/bin/python
[ -x "$python" ] || python=python3
if [ "${1:-}" = "--paths" ]; then
    shift
    exec "$python" scripts/bench/attach_paths.py "$@"
fi
exec "$python" scripts/bench/attach_http.py "$@"
