"""The attach index: which 14-digit keys are blocked or tracked, in memory, at GSMA scale.

The attach check answers from here and never from the database. ``index`` holds the index
itself (bitmaps and exceptions, the verdict table), ``index_file`` its persisted form,
``store_reader`` what it reads from the store, and ``keeper`` the ``IndexKeeper`` that loads or
builds one per process and follows ``change_log``.
"""

from imeisync.adapters.attach_index.index import AttachIndex, release_free_memory
from imeisync.adapters.attach_index.index_file import FORMAT_VERSION, MAGIC, Anchor, IndexFileError
from imeisync.adapters.attach_index.keeper import IndexKeeper
from imeisync.adapters.attach_index.store_reader import build_from_store, reader_engine

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Anchor",
    "AttachIndex",
    "IndexFileError",
    "IndexKeeper",
    "build_from_store",
    "reader_engine",
    "release_free_memory",
]
