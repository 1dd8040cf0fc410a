"""The Redis node behind the shipper's stream: a watermark holds only on the node it was
learned on.

Stream ids come from each node's own clock and history. Processes follow a failover at
different moments (an operator's `SENTINEL FAILOVER`, a master cut off from the sentinels
or paused that resumes): a worker that switched records r1 on the new master; a moment
later one that has not yet records r2 on the old; the shipper's process, not switched
either, ships r2 and moves its watermark past r1's id; then its pool follows the switch.
Reading after that watermark skipped r1, and the trim after the next batch deleted it: a
delivery without its record in history. A new master whose clock is behind the old one's
makes ids below the watermark the same way.

So the shipper knows the node (its run id, `INFO server`) its watermark was learned on. The
trim after each batch is one script (`TrimOn`) that trims only on that node, and answers
which node it ran on: one round trip, as the plain XTRIM was. Another node (a failover, a
restart, a pool that followed a switch; or none known: a shipper that just took the lock)
makes the shipper read the stream again from its start, its watermark in PostgreSQL and in
memory back at 0-0. Nothing is stored twice: records are stored by their primary key,
entries set aside by their stream id. The stream is short (trimmed after each batch), so
reading it again costs little. A node's stream is never trimmed by ids learned on another.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.lua import Key, Script

__all__ = ["TrimOn", "node_text"]


@dataclass
class TrimOn(Script):
    """XTRIM `stream` (exactly) to `minid` ('': not at all), only when the node is `node`
    (its run id); returns the run id of the node it ran on."""

    LUA = """
    local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
    if run_id == node and minid ~= '' then
      redis.call('XTRIM', stream, 'MINID', minid)
    end
    return run_id
    """
    stream: Key
    node: str
    minid: str


def node_text(answer: bytes | str) -> str:
    """`TrimOn`'s answer as text, whichever way the client decodes replies."""
    return answer.decode() if isinstance(answer, bytes) else answer
