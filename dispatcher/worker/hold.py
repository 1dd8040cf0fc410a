"""When a worker takes no new work from a shard: too many of that shard's writes wait (its
own: a shard not answering holds no other back), its Redis is away or full (its writes are
stalled), the history's backlog is past its bound (`shipping.py`: every shard's claims
stop), or a burst's jobs are spent.

Held back, the worker claims nothing from the shard, and a lane's next delivery that the
release of the one before took for it (`lanes.Adopt`, outside any claim) goes back to the
queue, due at once, instead of being sent: it is claimed once some worker takes work
again. Adoption ignored the hold, and a worker paused on the history backlog bound or on
stalled writes went on delivering an ordered lane's chain (review).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispatcher.worker.served import Served
    from dispatcher.worker.shipping import Shipping

__all__ = ["held_back"]


def held_back(run: Served, max_pending_writes: int, shipping: Shipping, spent: bool) -> bool:
    """Whether to take no new work from `run`'s shard now (`spent`: the burst's jobs)."""
    writer = run.writer
    return writer.pending > max_pending_writes or writer.stalled or shipping.full or spent
