"""Writing a file whole or not at all: the one way imeisync writes the attach index file, the
tokens file, the data key file, key pairs and telemetry snapshots.

A reader (another process, or this one after a crash) sees the old file or the new one, never
a torn one: the bytes go to a temporary file beside the target, created with its final mode
from the first byte, then renamed over the target (or linked to it only if it does not exist
yet), and the folder is synced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path


def write_atomic(path: Path, data: bytes | Iterable[bytes], *, mode: int | None = None,
                 replace: bool = True, durable: bool = True) -> bool:
    """Write ``data`` (bytes, or parts written one after the other) to ``path`` atomically.

    ``mode``: the file's exact permissions (default: 0666 narrowed by the umask).
    ``replace=False``: never clobber; returns False, writing nothing, if ``path`` exists.
    ``durable=False``: skip the fsyncs, for files that only live while the process does.
    Raises ``OSError``; callers say what the file is for.
    """
    parts = (data,) if isinstance(data, bytes) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    written = True
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it: make it exact
            for part in parts:
                handle.write(part)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and never clobbers: the first writer wins
            except FileExistsError:
                written = False
            except OSError:  # a filesystem without hard links
                if path.exists():
                    written = False
                else:
                    os.rename(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    if durable:
        fsync_directory(path.parent)
    return written


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
