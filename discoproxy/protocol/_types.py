"""Types shared by every parser in :mod:`discoproxy.protocol`.

Rule: parsers accept any contiguous byte buffer the I/O side happens to hold (the
``bytes`` of a single read, a growing ``bytearray``, a ``memoryview`` slice of a
ring buffer) without copying it first; they index and slice it, nothing more.
"""

from __future__ import annotations

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview
"""What a parser reads from. Indexing yields ``int``; slicing yields the same kind."""
