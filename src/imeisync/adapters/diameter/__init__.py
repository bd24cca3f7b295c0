"""Diameter (RFC 6733) for the S13 attach check: a small codec and the S13 application.

``codec`` reads and writes the wire format with strict bounds; ``s13`` turns an
ME-Identity-Check-Request into its answer from the attach index. Neither does I/O: the
asyncio server and the peer state machine are in ``entrypoints/s13_server.py``.
"""
