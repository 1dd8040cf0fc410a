"""A page of a Redis history index, as the scripts that read one find it: by rank."""

from __future__ import annotations

__all__ = ["WINDOW_RANKS"]

# A Lua fragment over an `index` (a sorted set of record ids by time) and the arguments
# `min_ms`, `max_ms`, `offset` and `count`: `total`, the members between `min_ms` and
# `max_ms`, and the ranks `first`..`last` of the page newest first, `count` from `offset`
# (none when `first > last`). By rank (O(log N)), not LIMIT offset (which walks `offset`
# entries). Read by `redis.Page` (the records) and `redis_failures.DeadOfPage` (the dead).
WINDOW_RANKS = """
local total = redis.call('ZCOUNT', index, min_ms, max_ms)
local above = redis.call('ZCOUNT', index, '(' .. max_ms, '+inf')
local first = above + tonumber(offset)
local last = math.min(above + total, first + tonumber(count)) - 1
"""
