"""The relay core of ``serve``: one mailbox per worker id, fan-out, unique dedup.

Deliberately small and in-memory: its job is to behave like a correct broker (PROTOCOL.md
§5) so that the clients under test see realistic traffic while ``serve`` checks their bytes.
"""

from __future__ import annotations

import random
import time
from collections import deque

import anyio

__all__ = ["Hub", "Mailbox"]

#: Past this many remembered unique keys, expired ones are swept (keeps memory bounded
#: without a timer task).
MAX_UNIQUE_KEYS = 1024


class Mailbox:
    """The bounded queue of one worker id; outlives that worker's connections."""

    def __init__(self, wid: int, limit: int, *, pinned: bool) -> None:
        self.wid = wid
        self.limit = limit
        #: Pinned mailboxes (ids the broker was told to expect) never expire.
        self.pinned = pinned
        self.items: deque[bytes] = deque()
        self.dropped = 0
        self.owner: object | None = None
        self.expires: float | None = None
        self._wake = anyio.Event()

    def put(self, data: bytes) -> bool:
        if len(self.items) >= self.limit:
            self.dropped += 1
            return False
        self.items.append(data)
        self._wake.set()
        return True

    def push_front(self, data: bytes) -> None:
        """Give back a delivery that could not be written (it stays first in line)."""
        self.items.appendleft(data)
        self._wake.set()

    async def get(self) -> bytes:
        while not self.items:
            self._wake = anyio.Event()
            await self._wake.wait()
        return self.items.popleft()


class Hub:
    """Which mailboxes exist, who owns them, and where a publish goes."""

    def __init__(self, *, unique_timeout: float, workers: int | None, grace: float,
                 max_queue: int, rng: random.Random | None = None) -> None:
        self.unique_timeout = unique_timeout
        self.grace = grace
        self.max_queue = max_queue
        self.rng = rng or random.Random()
        self.boxes: dict[int, Mailbox] = {
            wid: Mailbox(wid, max_queue, pinned=True) for wid in range(workers or 0)
        }
        self.uniques: dict[str, float] = {}

    def _box(self, wid: int) -> Mailbox:
        box = self.boxes.get(wid)
        if box is None:
            box = Mailbox(wid, self.max_queue, pinned=False)
            box.expires = time.monotonic() + self.grace
            self.boxes[wid] = box
        return box

    def live(self) -> list[Mailbox]:
        """Mailboxes that receive publishes now; expired ones of gone workers are dropped."""
        now = time.monotonic()
        for wid, box in list(self.boxes.items()):
            if box.owner is None and not box.pinned and box.expires is not None \
                    and box.expires <= now:
                del self.boxes[wid]
        return list(self.boxes.values())

    def attach(self, wid: int, owner: object) -> tuple[Mailbox, object | None]:
        """Give ``wid``'s mailbox to ``owner``; returns it and the owner it replaces."""
        box = self._box(wid)
        previous, box.owner, box.expires = box.owner, owner, None
        return box, previous

    def detach(self, box: Mailbox, owner: object) -> None:
        if box.owner is owner:
            box.owner = None
            box.expires = time.monotonic() + self.grace

    def route(self, publisher: int, spec: dict[object, object], data: bytes) -> int:
        """Queue ``data`` for the spec's targets; returns how many mailboxes took it."""
        if "unique" in spec:
            key = str(spec["unique"])
            now = time.monotonic()
            if self.uniques.get(key, 0.0) > now:
                return 0
            if len(self.uniques) > MAX_UNIQUE_KEYS:
                self.uniques = {k: t for k, t in self.uniques.items() if t > now}
            self.uniques[key] = now + self.unique_timeout
            boxes = self.live()
            connected = [b for b in boxes if b.owner is not None]
            pool = connected or boxes
            return int(self.rng.choice(pool).put(data)) if pool else 0
        if "worker" in spec and isinstance(spec["worker"], int):
            return int(self._box(spec["worker"]).put(data))
        boxes = self.live()
        if spec.get("others") is True:
            boxes = [b for b in boxes if b.wid != publisher]
        return sum(b.put(data) for b in boxes)
