"""Which ranks reached a point of the program, told through the process group's store.

A collective that one rank never reaches waits for the full ``dist_timeout`` and then names no
rank. The store (the key-value server every rank of the group already talks to) answers sooner and
can say who is missing. It is not the process group, so a thread may use it while the main thread
is inside a collective.

Every rank costs the store the same few operations, however many ranks there are (a store serves
every rank of the job: what each rank asks of it must not grow with the job). An arrival is one
``add`` to a counter and one ``append`` of the rank to a list; the rank that completes the count
sets one key that the others wait for. Only when the wait times out does anyone read the list, and
then one rank (the first to arrive) judges and publishes the verdict that the others read. The
keys of a point are deleted by the last rank to leave it, so a long run leaves nothing behind.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

from . import collectives


def default_store() -> Any:
    """The default group's store (torchrun's TCPStore, a FileStore, ...), or None outside a group."""
    if not collectives.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


class Arrivals:
    """The ranks that reach the point named ``prefix`` (unique per point: "anndist/save7")."""

    def __init__(self, store: Any, prefix: str, world_size: int) -> None:
        self.store, self.prefix, self.world_size = store, prefix, world_size
        self.order = 0  # this rank's place among the arrivals, from 1

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def arrive(self, rank: int, note: str = "") -> None:
        """Post this rank (and a short ``note``, such as a count) as arrived."""
        self.store.append(self._key("ranks"), f"{rank}:{note},")
        self.order = self.store.add(self._key("count"), 1)
        if self.order == self.world_size:
            self.store.set(self._key("all"), "1")

    def wait_all(self, timeout: float) -> bool:
        """Whether every rank arrived within ``timeout`` seconds."""
        try:
            self.store.wait([self._key("all")], timedelta(seconds=timeout))
            return True
        except RuntimeError:  # a timeout (DistStoreError)
            return False

    def arrived(self) -> dict[int, str]:
        """The ranks that arrived so far and their notes (one read of one key)."""
        found = {}
        for item in self.store.get(self._key("ranks")).decode().split(","):
            if item:
                rank, _, note = item.partition(":")
                found[int(rank)] = note
        return found

    def missing(self) -> list[int]:
        arrived = self.arrived()
        return [r for r in range(self.world_size) if r not in arrived]

    def leave(self) -> None:
        """This rank is done with the point; the last to leave deletes its keys."""
        if self.store.add(self._key("left"), 1) == self.world_size:
            self.forget()

    def forget(self) -> None:
        for name in ("ranks", "count", "all", "left", "verdict"):
            try:
                self.store.delete_key(self._key(name))
            except RuntimeError:  # a store without deletes keeps them: nothing else to do
                return

    def verdict(self, judge: Callable[[], str], timeout: float) -> str | None:
        """The first rank to arrive runs ``judge`` once the others arrived or ``timeout`` passed, and
        publishes its answer; every rank returns it (None if the judge never published one)."""
        if self.order == 1:
            self.wait_all(timeout)
            self.store.set(self._key("verdict"), judge())
        try:
            self.store.wait([self._key("verdict")], timedelta(seconds=timeout + 5.0))
        except RuntimeError:
            return None
        return self.store.get(self._key("verdict")).decode()


def missing_ranks(store: Any, prefix: str, rank: int, world_size: int, timeout: float) -> list[int]:
    """Post this rank's arrival at ``prefix`` and wait for the others: the ranks that have not arrived
    within ``timeout`` seconds ([] when all have, and then the keys are cleaned up)."""
    point = Arrivals(store, prefix, world_size)
    point.arrive(rank)
    if point.wait_all(timeout):
        point.leave()
        return []
    return point.missing()
