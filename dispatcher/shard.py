"""One shard: its position in the list of shards, its key namespace, the URL it is on."""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.keys import Keys

__all__ = ["ID_SPAN", "Shard"]

# Each shard hands out callback and record ids from its own range, [n * ID_SPAN, (n + 1) *
# ID_SPAN): ids are unique over all shards, so a platform-wide callback keeps one id on
# every shard, a moved project keeps its ids, and one PostgreSQL history takes the records
# of all shards. Shard 0's range starts at 0: a single Redis's ids are unchanged. 999
# shards fit the 15 digits of a padded record id.
ID_SPAN = 10**12


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index`: its keys, on the Redis of `url` (a Redis Cluster's URL for each shard
    of a cluster, whose `keys` then carry the shard's hash tag)."""

    index: int
    keys: Keys
    url: str = ""
    cluster: bool = False

    @classmethod
    def single(cls, queue_name: str, url: str = "") -> Shard:
        """The one shard of a single Redis: today's keys, exactly."""
        return cls(0, Keys(queue_name), url)

    @property
    def id_floor(self) -> int:
        """The first id of this shard's range (see `ID_SPAN`)."""
        return self.index * ID_SPAN

    @property
    def stream_name(self) -> str:
        """The name the PostgreSQL shipper tracks this shard's stream by: the stream's key,
        and its position for the servers of a list (where every stream has the same key)."""
        if self.index == 0 or self.cluster:
            return self.keys.HISTORY_STREAM
        return f"{self.keys.HISTORY_STREAM}@{self.index}"

    def __str__(self) -> str:
        return f"shard {self.index}"
