"""The systemd notification protocol (sd_notify), spoken directly over ``$NOTIFY_SOCKET``.

A datagram of ``KEY=VALUE`` lines to an ``AF_UNIX`` socket (a path, or an abstract name when it
starts with ``@``), see sd_notify(3). Without ``$NOTIFY_SOCKET`` (not under systemd, or
``Type=simple``) every call is a no-op that returns False, so the daemon calls it
unconditionally. No library: the protocol is one ``sendto``.

>>> Notifier(None).notify(READY=1)
False
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager named by ``$NOTIFY_SOCKET``."""

    def __init__(self, address: str | None = None, *, from_environment: bool = True):
        if address is None and from_environment:
            address = os.environ.get("NOTIFY_SOCKET") or None
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: object) -> bool:
        """``notify(READY=1, STATUS="serving")`` → ``b"READY=1\\nSTATUS=serving"``."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, target)
            return True
        except OSError as exc:
            if not self._warned:  # once: a broken socket must not flood the log
                self._warned = True
                log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload managers match this to the SIGHUP.
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """How often to ping: half of ``$WATCHDOG_USEC`` (when it is meant for this process),
    as sd_watchdog_enabled(3) recommends; None when no watchdog is configured."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def announce_http_service(health_url: str, *, notifier: Notifier | None = None,
                          timeout: float = 120.0) -> threading.Thread | None:
    """For a plain Granian server under ``Type=notify`` (the reference registry): a thread that
    sends ``READY=1`` once ``health_url`` answers, then ``WATCHDOG=1`` while it still answers
    (any HTTP status: an outage of its database is not a hang). Nothing without $NOTIFY_SOCKET.
    """
    notifier = notifier or Notifier()
    if not notifier.enabled:
        return None
    interval = watchdog_interval()

    def answers() -> bool:
        try:
            with urllib.request.urlopen(health_url, timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # it answered: alive
        except OSError:
            return False

    def run() -> None:
        deadline = time.monotonic() + timeout
        while not answers():
            if time.monotonic() > deadline:
                log.error("%s did not answer within %ss; not reporting ready", health_url,
                          timeout)
                return
            time.sleep(0.1)
        notifier.ready(f"serving on {health_url.rsplit('/', 1)[0]}")
        while interval:
            time.sleep(interval)
            if answers():
                notifier.watchdog()
            else:
                log.error("%s does not answer: not pinging the watchdog", health_url)

    thread = threading.Thread(target=run, name="sd-notify", daemon=True)
    thread.start()
    return thread
