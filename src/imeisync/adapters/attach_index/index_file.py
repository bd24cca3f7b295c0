"""The persisted index (``[eir] index_file``), so a restart loads in seconds what a build from
the store takes minutes for.

The file is written atomically (``adapters.files.write_atomic``) with a header carrying the
change sequence it reflects, the change at that sequence (so a file made from another database,
or a database restored from an older backup, is not trusted) and a SHA-256 over header and
payload (so a torn or corrupted file is detected and rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pyroaring import BitMap64

from imeisync.adapters.attach_index.index import AttachIndex, release_free_memory
from imeisync.adapters.files import write_atomic

MAGIC = b"IMSYAIX\x00"
FORMAT_VERSION = 2  # 2: range bitmaps (a version-1 file is rebuilt from the store)
# magic, version, flags, seq, written_at, n_blocked, n_tracked, n_exceptions,
# len_blocked, len_tracked, len_exceptions, len_anchor, len_range_blocked, len_range_tracked;
# then 32 bytes of SHA-256.
_HEADER = struct.Struct("<8sHHqdQQQQQQQQQ")


class IndexFileError(Exception):
    """The persisted index cannot be used (missing, truncated, corrupted, foreign)."""

    def __init__(self, message: str, *, missing: bool = False):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Anchor:
    """The change at the file's sequence: a database that does not hold it is another one."""

    seq: int
    imei_key: str | None  # None at seq 0 (nothing ever changed)
    at: str | None

    def encode(self) -> bytes:
        return json.dumps([self.seq, self.imei_key, self.at]).encode()

    @classmethod
    def decode(cls, data: bytes) -> Anchor:
        seq, key, at = json.loads(data)
        return cls(int(seq), key, at)


def save(index: AttachIndex, path: Path, anchor: Anchor) -> int:
    """Write the index to ``path`` atomically; returns the file's size in bytes."""
    blocked = index.blocked.serialize()
    tracked = index.tracked.serialize()
    range_blocked = index.range_blocked.serialize()
    range_tracked = index.range_tracked.serialize()
    exc = json.dumps(
        {str(k): sorted(v) for k, v in index.exceptions.items()}, separators=(",", ":")
    ).encode()
    anchor_bytes = anchor.encode()
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, 0, index.seq, time.time(),
        len(index.blocked), len(index.tracked), len(index.exceptions),
        len(blocked), len(tracked), len(exc), len(anchor_bytes),
        len(range_blocked), len(range_tracked),
    )
    parts = (anchor_bytes, blocked, tracked, exc, range_blocked, range_tracked)
    digest = hashlib.sha256(header)
    for part in parts:
        digest.update(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (header, digest.digest(), *parts))
    return _HEADER.size + 32 + sum(len(part) for part in parts)


def load(path: Path) -> tuple[AttachIndex, Anchor]:
    """Read a file written by ``save``; ``IndexFileError`` says why it is unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexFileError(f"{path} does not exist", missing=True) from None
    except OSError as exc:
        raise IndexFileError(f"{path} cannot be read: {exc.strerror}") from None
    if len(data) < _HEADER.size + 32:
        raise IndexFileError(f"{path} is truncated ({len(data)} bytes)")
    (magic, version, _flags, seq, _written, n_blocked, n_tracked, n_exc,
     len_blocked, len_tracked, len_exc, len_anchor, len_rb, len_rt) = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IndexFileError(f"{path} is not an imeisync attach index (bad magic)")
    if version != FORMAT_VERSION:
        raise IndexFileError(f"{path} has format version {version}, expected {FORMAT_VERSION}")
    start = _HEADER.size + 32
    end = start + len_anchor + len_blocked + len_tracked + len_exc + len_rb + len_rt
    if end != len(data):
        raise IndexFileError(
            f"{path} has {len(data)} bytes, its header announces {end} (truncated or padded)"
        )
    view = memoryview(data)
    digest = hashlib.sha256(view[: _HEADER.size])
    digest.update(view[start:end])
    if digest.digest() != data[_HEADER.size : start]:
        raise IndexFileError(f"{path} fails its SHA-256 checksum (corrupted)")
    try:
        anchor = Anchor.decode(bytes(view[start : start + len_anchor]))
        start += len_anchor
        # pyroaring reads any buffer (no copy of the bitmap); its stub says bytes only.
        blocked = BitMap64.deserialize(view[start : start + len_blocked])  # type: ignore[arg-type]
        start += len_blocked
        tracked = BitMap64.deserialize(view[start : start + len_tracked])  # type: ignore[arg-type]
        start += len_tracked
        raw = json.loads(bytes(view[start : start + len_exc]))
        start += len_exc
        exceptions = {int(k): frozenset(v) for k, v in raw.items()}
        range_blocked = BitMap64.deserialize(view[start : start + len_rb])  # type: ignore[arg-type]
        start += len_rb
        range_tracked = BitMap64.deserialize(view[start : start + len_rt])  # type: ignore[arg-type]
    except Exception as exc:  # checksum passed: a writer bug, not bit rot
        raise IndexFileError(f"{path} cannot be decoded: {exc}") from None
    if (len(blocked), len(tracked), len(exceptions)) != (n_blocked, n_tracked, n_exc):
        raise IndexFileError(f"{path}: entry counts do not match its header")
    del view, data
    release_free_memory()
    return AttachIndex(blocked, tracked, exceptions, seq, range_blocked, range_tracked), anchor
