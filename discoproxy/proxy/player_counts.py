"""``max_players`` across workers: each worker's players per capped route, in one block of
shared memory that every worker reads.

Rules for this file:
- The control plane creates the block (a memfd: no file on disk, gone with the last
  process that maps it), one row per worker and one column (slot) per route that has
  ``max_players``, and hands its fd to every worker at start. It alone assigns slots
  (:class:`PlayerSlots`, the loop's), sends the mapping before each table (so a worker
  knows a route's slot before it routes to it) and frees a slot only once its route is
  gone and every row holds 0 there; a freed slot is given out again only after
  :data:`REUSE_AFTER_S`, long after every worker has the mapping without it (a worker
  still on an older table could write the old route's count there meanwhile). It
  zeroes a worker's row when that worker exits (its players went with it), before the
  replacement starts; a worker writes every slot of each mapping it gets.
- A worker writes only its own row (:class:`PlayerCounts`, the reactor's): the number
  of players of a route it holds, written after each login counted and each one gone,
  so no write races another. A login reads the other rows and adds its own count:
  no lock and no round trip on the login's path, and a limit that holds whichever
  worker a player's IP is steered to. Two logins on two workers in the same instant
  can each read the other's row before it is written: a route may then go over its
  ``max_players`` by at most one login per other worker, for that instant.
- More capped routes than :data:`SLOTS` (a table of that many routes with
  ``max_players``): the ones past it count per worker, and the control plane logs it.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterable, Mapping

from loguru import logger

from discoproxy.owners import LOOP, REACTOR, owned_by

# Capped routes per table with a shared count. Pages are only allocated where written
# (a memfd is sparse): 4 bytes a route a worker, the rest costs nothing.
SLOTS = 65_536
_CELL = 4  # int32: players of one route on one worker
_ROW = SLOTS * _CELL  # bytes: a multiple of the page size, so a row can be freed whole
# A freed slot waits this long before another route gets it: the mapping without it
# reaches every worker in far less (messages in order, each worker's outbox).
REUSE_AFTER_S = 60.0


def _cells(fd: int, workers: int) -> tuple[mmap.mmap, memoryview]:
    block = mmap.mmap(fd, workers * _ROW)  # MAP_SHARED, read and write
    return block, memoryview(block).cast("i")


@owned_by(LOOP)
class PlayerSlots:
    """The control plane's side: the block, and which slot each capped route has."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.fd = os.memfd_create("discoproxy-players", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, workers * _ROW)
        self._block, self._cells = _cells(self.fd, workers)
        self.slots: dict[str, int] = {}  # route qualified id → slot
        self._free: list[int] = []
        self._cooling: list[tuple[float, int]] = []  # (freed at, slot), oldest first
        self._next = 0
        self._overflow_logged = False

    def update(self, capped: Iterable[str]) -> Mapping[str, int] | None:
        """The table's routes with ``max_players``: give each a slot, free those of routes
        gone whose players are all gone too. The new mapping, or None when unchanged."""
        wanted = set(capped)
        before = dict(self.slots)
        now = time.monotonic()
        while self._cooling and now - self._cooling[0][0] >= REUSE_AFTER_S:
            self._free.append(self._cooling.pop(0)[1])
        freed = []
        for qid in [q for q in self.slots if q not in wanted]:
            slot = self.slots[qid]
            if not any(self._cells[row * SLOTS + slot] for row in range(self.workers)):
                del self.slots[qid]
                freed.append(slot)
        for qid in sorted(wanted - set(self.slots)):
            if self._free:
                self.slots[qid] = self._free.pop()
            elif self._next < SLOTS:
                self.slots[qid] = self._next
                self._next += 1
            elif not self._overflow_logged:
                self._overflow_logged = True
                logger.error(
                    "more than {} routes with max_players: the others count their players "
                    "per worker",
                    SLOTS,
                )
        self._cooling.extend((now, slot) for slot in freed)
        return None if self.slots == before else dict(self.slots)

    def clear_row(self, row: int) -> None:
        """Worker ``row`` exited: its players are gone (the row's pages are freed, and
        read as zeros again; writing zeros would allocate all of them)."""
        self._block.madvise(mmap.MADV_REMOVE, row * _ROW, _ROW)

    def close(self) -> None:
        self._cells.release()
        self._block.close()
        os.close(self.fd)


@owned_by(REACTOR)
class PlayerCounts:
    """A worker's side: its row to write, the others to read."""

    def __init__(self, fd: int, workers: int, row: int) -> None:
        self._block, self._cells = _cells(fd, workers)
        os.close(fd)  # the mapping keeps the memory
        self._others = [r * SLOTS for r in range(workers) if r != row]
        self._row = row * SLOTS  # zeroed by the control plane when its last holder exited
        self.slots: Mapping[str, int] = {}

    def adopt(self, slots: Mapping[str, int], local: Mapping[str, int]) -> None:
        """A new mapping (before the table that needs it): write this worker's count of
        every route in it (``local``: players per route id), new slots included."""
        self.slots = slots
        cells, row = self._cells, self._row
        for qid, slot in slots.items():
            cells[row + slot] = local.get(qid, 0)

    def total(self, qid: str, local: int) -> int:
        """Players of route ``qid`` over every worker, ``local`` being this one's."""
        slot = self.slots.get(qid)
        if slot is None:
            return local
        cells = self._cells
        for offset in self._others:
            local += cells[offset + slot]
        return local

    def publish(self, qid: str, local: int) -> None:
        """This worker now holds ``local`` players of route ``qid``."""
        slot = self.slots.get(qid)
        if slot is not None:
            self._cells[self._row + slot] = local
