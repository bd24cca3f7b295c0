"""The index itself: blocked and tracked keys and exceptions, answered from memory.

* ``blocked`` and ``tracked`` -- ``pyroaring.BitMap64`` over the key as an integer
  (``domain.imei.key_to_int``). IMEIs cluster by TAC (the device model), so a compressed bitmap
  holds ~2.5 bytes per entry where a Python set needs ~75, and a lookup costs ~0.3 µs.
* ``range_blocked`` and ``range_tracked`` -- the keys of open range records (a stolen
  shipment). A range is a run of keys, which roaring stores in a few bytes -- but only in a
  bitmap of its own: added to the singles' bitmaps, a range over a TAC with scattered singles
  turns their small array containers into 8 KB bitmap containers (measured with
  ``scripts/bench/attach_ranges.py``: 50M singles + 100,000 ranges took 1.36x the singles'
  memory merged). Apart, a lookup probes two more bitmaps; no union of them is kept, as its
  containers would cost as much memory again as the ranges themselves.
* ``exceptions`` -- key → frozenset of IMSIs allowed through a block (a few, at most thousands).
* ``tacs`` -- the TAC table's TACs (``BitMap``, 32-bit) while ``[eir] unknown_tac`` is grey or
  black and a table is loaded, else None: probed only for a device with no record.

The verdict itself is ``domain.verdict.verdict()``: the index only tabulates it once for the
eight combinations of (blocked, tracked, excepted), so the rule stays written in one place.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pyroaring import BitMap, BitMap64

from imeisync.domain.verdict import Status, verdict

if TYPE_CHECKING:
    from imeisync.adapters.attach_index.index_file import Anchor

_NO_IMSIS: frozenset[str] = frozenset()
ANSWERED_RING = 4096  # a power of two
_RING_MASK = ANSWERED_RING - 1
_SERIALS = 1_000_000  # key // _SERIALS is the TAC


def verdict_table(unknown_tac: str = "ignore") -> tuple[Status, ...]:
    """The verdict for every (tac unknown, blocked, tracked, excepted) as bits 8/4/2/1, by the
    one rule in domain.verdict, for one ``[eir] unknown_tac`` policy."""
    return tuple(
        verdict(blocked=bool(i & 4), tracked=bool(i & 2), excepted=bool(i & 1),
                tac_unknown=bool(i & 8), unknown_tac=unknown_tac)
        for i in range(16)
    )


_TABLE = verdict_table()


class AttachIndex:
    """Blocked and tracked keys, exceptions, and the change sequence they reflect.

    ``lookup`` may run concurrently with ``apply`` (the follower thread): every change adds
    the new state before removing the old one, so a reader sees either state, never neither.
    """

    __slots__ = ("_table", "answered", "answered_n", "blocked", "exceptions", "range_blocked",
                 "range_tracked", "seq", "tacs", "tracked", "unknown_tac")

    def __init__(
        self,
        blocked: BitMap64 | None = None,
        tracked: BitMap64 | None = None,
        exceptions: dict[int, frozenset[str]] | None = None,
        seq: int = 0,
        range_blocked: BitMap64 | None = None,
        range_tracked: BitMap64 | None = None,
    ):
        self.blocked = blocked if blocked is not None else BitMap64()
        self.tracked = tracked if tracked is not None else BitMap64()
        self.range_blocked = range_blocked if range_blocked is not None else BitMap64()
        self.range_tracked = range_tracked if range_tracked is not None else BitMap64()
        self.exceptions = exceptions if exceptions is not None else {}
        self.seq = seq
        # The last BLACKLISTED answers' keys, a ring the follower thread audits for answers
        # about devices lifted over a minute ago (``violations.py``); preallocated, and a
        # write costs two attribute operations on a BLACKLISTED answer only.
        self.answered = [0] * ANSWERED_RING
        self.answered_n = 0
        self.tacs: BitMap | None = None
        self.unknown_tac = "ignore"
        self._table = _TABLE

    def lookup(self, key: int, imsi: str | None = None) -> Status:
        """The verdict for a key (``key_to_int``) and, optionally, the subscriber's IMSI."""
        i = 4 if key in self.blocked else 0
        if key in self.tracked:
            i |= 2
        if key in self.range_blocked:
            i |= 4
        if key in self.range_tracked:
            i |= 2
        if imsi is not None and imsi in self.exceptions.get(key, _NO_IMSIS):
            i |= 1
        if i & 5 == 4:  # blocked and not excepted: BLACKLISTED
            self.answered[self.answered_n & _RING_MASK] = key
            self.answered_n += 1
        elif i < 2 and self.tacs is not None and key // _SERIALS not in self.tacs:
            i |= 8
        return self._table[i]

    def set_tacs(self, tacs: BitMap | None, unknown_tac: str) -> None:
        """The TAC table (None or empty: not loaded) and the policy for TACs missing from it;
        the table is kept only when the policy uses it, so ``ignore`` costs nothing."""
        self.unknown_tac = unknown_tac
        self._table = verdict_table(unknown_tac)
        self.tacs = tacs if tacs and unknown_tac != "ignore" else None

    def __len__(self) -> int:
        """Entries: keys with at least one open record (blocked, tracked or both)."""
        return len(self.blocked) + len(self.tracked) - self.blocked.intersection_cardinality(
            self.tracked
        )

    def counts(self) -> dict[str, int]:
        return {
            "entries": len(self),
            "blocked": len(self.blocked),
            "tracked": len(self.tracked),
            "exception_keys": len(self.exceptions),
            "range_devices_blocked": len(self.range_blocked),
            "range_devices_tracked": len(self.range_tracked),
        }

    def apply_window(self, first: int, last: int, blocked: BitMap64, tracked: BitMap64) -> None:
        """Set the range state of every key in ``first..last`` (a range that changed):
        ``blocked`` and ``tracked`` hold the keys of the window inside open ranges of that kind
        (every range overlapping it). Adds come before removals, as in ``apply``."""
        window = BitMap64()
        window.add_range(first, last + 1)
        pairs = ((self.range_blocked, blocked), (self.range_tracked, tracked))
        stale = [current.intersection(window).difference(wanted) for current, wanted in pairs]
        for current, wanted in pairs:
            current.update(wanted)
        # Removals after every add: a reader never sees neither state.
        for (current, _wanted), gone in reversed(list(zip(pairs, stale, strict=True))):
            current.difference_update(gone)

    # -- changes --------------------------------------------------------------------------

    def apply(
        self,
        records: dict[int, set[str]],
        exceptions: dict[int, frozenset[str]],
        keys: Iterable[int],
    ) -> None:
        """Set the state of ``keys``: open record kinds per key, active IMSIs per key.

        A key absent from ``records``/``exceptions`` has none. Adds come before removals.
        """
        add_blocked: list[int] = []
        add_tracked: list[int] = []
        drop_blocked: list[int] = []
        drop_tracked: list[int] = []
        for key in keys:
            kinds = records.get(key, ())
            (add_blocked if "block" in kinds else drop_blocked).append(key)
            (add_tracked if "track" in kinds else drop_tracked).append(key)
            imsis = exceptions.get(key)
            if imsis:
                self.exceptions[key] = imsis
            else:
                self.exceptions.pop(key, None)
        self.blocked.update(add_blocked)
        self.tracked.update(add_tracked)
        for key in drop_blocked:
            self.blocked.discard(key)
        for key in drop_tracked:
            self.tracked.discard(key)

    # -- persistence (``index_file``) ------------------------------------------------------

    def save(self, path: Path, anchor: Anchor) -> int:
        """Write the index to ``path`` atomically; returns the file's size in bytes."""
        from imeisync.adapters.attach_index import index_file

        return index_file.save(self, path, anchor)

    @classmethod
    def load(cls, path: Path) -> tuple[AttachIndex, Anchor]:
        """Read a file written by ``save``; ``IndexFileError`` says why it is unusable."""
        from imeisync.adapters.attach_index import index_file

        return index_file.load(path)


def release_free_memory() -> None:
    """Hand the heap freed by a build or load back to the system (glibc), so the resident
    size is the index and not the peak of making it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
