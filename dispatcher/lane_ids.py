"""What a lane of ordered deliveries is called (`dispatcher.worker.lanes`; its key is
`keys.Keys.lane`): `{receiver hash}:{project}:{key}`, a key past `LANE_KEY_MAX` characters
by its hash."""

from __future__ import annotations

import functools
import hashlib

from dispatcher.keys import SEP

__all__ = ["LANE_KEY_MAX", "lane_id"]

LANE_KEY_MAX = 200  # a longer orderBy value names its lane by its hash


def lane_id(owner: str, url: str, order_by: str, project_id: str, key: str) -> str:
    """The lane of the deliveries to `url` (registered by `owner` with `order_by`, for any
    event) of `project_id`'s events whose key is `key` (a long key by its hash):
    `{receiver hash}:{project}:{key}`."""
    receiver = hashlib.blake2b(f"{owner}\n{url}\n{order_by}".encode(), digest_size=8).hexdigest()
    if len(key) > LANE_KEY_MAX:
        key = _long_key(key)
    return f"{receiver}{SEP}{project_id}{SEP}{key}"


@functools.lru_cache(maxsize=8)  # an event's key: the same for each of its callbacks
def _long_key(key: str) -> str:
    """A key past `LANE_KEY_MAX` as its lane names it, `#` and its BLAKE2b-128 hash, made
    once per event, not once per callback: a 1 MiB value took ~1.1 ms to hash, ~0.55 s of
    the worker's loop for a chunk of 500 ordered callbacks (review). An entry is the
    event's own string, so a lookup hashes nothing (Python keeps a string's hash)."""
    return "#" + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
