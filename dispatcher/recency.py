"""`OwnedLRU`: what a worker keeps for many projects at once (circuit breakers, matched
chunks), bounded so that one project cannot push out the others': a project keeps at most
its share, its own least recently used going first, and all of them together a total, the
least recently used of all going first."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["OwnedLRU"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Owner(Generic[K]):
    """One owner's keys, least recently used first, and their weight."""

    keys: OrderedDict[K, None] = field(default_factory=OrderedDict)
    weight: int = 0


class OwnedLRU(Generic[K, V]):
    """Values under (owner, key): an owner keeps at most `most` of them and `most_weight`
    of their weight, and all owners together `total` and `total_weight`. A value is used
    when `touch`ed or `put`; `find` looks without using it."""

    def __init__(
        self,
        most: int,
        total: int,
        *,
        most_weight: float = math.inf,
        total_weight: float = math.inf,
    ) -> None:
        self.most, self.total = most, total
        self.most_weight, self.total_weight = most_weight, total_weight
        self._all: OrderedDict[tuple[str, K], tuple[V, int]] = OrderedDict()  # by use
        self._owners: dict[str, _Owner[K]] = {}
        self._weight = 0

    def find(self, owner: str, key: K) -> V | None:
        """The value under (`owner`, `key`), if kept; not a use."""
        kept = self._all.get((owner, key))
        return None if kept is None else kept[0]

    def touch(self, owner: str, key: K) -> None:
        """Mark the value under (`owner`, `key`), kept, as used now."""
        self._all.move_to_end((owner, key))
        self._owners[owner].keys.move_to_end(key)

    def put(self, owner: str, key: K, value: V, weight: int = 1) -> None:
        """Keep `value` (in place of any before it), then drop what is past the bounds:
        the owner's own least recently used first, then the least recently used of all."""
        self.pop(owner, key)
        self._all[(owner, key)] = (value, weight)
        self._weight += weight
        mine = self._owners.setdefault(owner, _Owner())
        mine.keys[key] = None
        mine.weight += weight
        while len(mine.keys) > self.most or mine.weight > self.most_weight:
            self.pop(owner, next(iter(mine.keys)))
        while len(self._all) > self.total or self._weight > self.total_weight:
            self.pop(*next(iter(self._all)))

    def pop(self, owner: str, key: K) -> None:
        """Forget the value under (`owner`, `key`), if kept."""
        kept = self._all.pop((owner, key), None)
        if kept is None:
            return
        self._weight -= kept[1]
        mine = self._owners[owner]
        del mine.keys[key]
        mine.weight -= kept[1]
        if not mine.keys:
            del self._owners[owner]
