"""Where a shard's keys live on a Redis Cluster: the hash tag that puts them in one slot,
and the slots the shards take, spread evenly over the slot range."""

from __future__ import annotations

import functools

from redis.crc import key_slot

__all__ = ["CLUSTER_SLOTS", "cluster_tag", "target_slot"]

CLUSTER_SLOTS = 16384


@functools.cache
def cluster_tag(index: int) -> str:
    """The hash tag of shard `index` on a Redis Cluster, `d<index>.<k>`: the first `k` that
    puts it in slot `target_slot(index)`, so that the shards spread over the slot range
    (and, with it, over the masters) whatever their number."""
    wanted = target_slot(index)
    for k in range(1_000_000):
        tag = f"d{index}.{k}"
        if key_slot(tag.encode()) == wanted:
            return tag
    raise AssertionError(f"no tag for slot {wanted}")  # pragma: no cover: CRC16 covers all


def target_slot(index: int) -> int:
    """Shard `index`'s slot: `index` bit-reversed over the 14 bits of a slot number (0,
    8192, 4096, 12288, ...), so that the first n shards halve the range again and again."""
    return int(f"{index:014b}"[::-1], 2) if index < CLUSTER_SLOTS else index % CLUSTER_SLOTS
