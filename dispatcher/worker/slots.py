"""A worker's slots: `DISPATCHER_WORKER_MAX_JOBS` jobs run at once, each holding one.

A job holds its slot until its task ends, except, with several shards served, a job of a
shard whose writes do not land: a failed run waiting for a put-back its shard has not
taken (`Served.failed_run`) gives its slot up (`free`), and every job of a shard whose
writer has had a batch in flight for a second (`Writer.stuck`: its jobs wait for their
records' writes) counts for none while that lasts. They stay running (their leases
renewed, passed over by the worker's claims, which take nothing from that shard
meanwhile: `Writer.stalled`). Otherwise the jobs of a frozen shard, each waiting for its
Redis, would keep every slot once they had filled them, and the other shards would claim
nothing for as long as it stayed frozen, or until the jobs' timeout (review).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispatcher.worker.served import Served

__all__ = ["JobKey", "Slots"]

# a running job: the shard it was claimed on, and its id there
JobKey = tuple[int, str]


class Slots:
    """The jobs running (`running`, by shard and id) and the room they leave; `wait`
    returns once `batch` slots are free (or a poll interval passed)."""

    def __init__(self, max_jobs: int, batch: int, served: Sequence[Served] = ()) -> None:
        self.max_jobs = max_jobs
        self.batch = batch
        # with several shards served, each one's writer (whose batch stuck frees its jobs)
        self._writers = {run.index: run.writer for run in served} if len(served) > 1 else {}
        self.running: dict[JobKey, asyncio.Task[None]] = {}
        self._freed: set[asyncio.Task[None]] = set()  # running, holding no slot
        self._room = asyncio.Event()

    def left(self) -> int:
        """The slots free: one per job running, but for those freed and those of a shard
        whose writes are stuck."""
        stuck = {index for index, writer in self._writers.items() if writer.stuck()}
        waiting = [t for (i, _), t in self.running.items() if i in stuck] if stuck else []
        return self.max_jobs - len(self.running) + len(self._freed.union(waiting))

    def ended(self, key: JobKey, task: asyncio.Task[None]) -> None:
        """`task`, running job `key`, ended."""
        if self.running.get(key) is task:  # not a new run of the same job (a fan-out's)
            del self.running[key]
        self._freed.discard(task)
        self._roomy()

    def free(self, key: JobKey) -> None:
        """The job this task runs, `key`, gives its slot up (see the module)."""
        task = asyncio.current_task()
        if task is not None and self.running.get(key) is task:
            self._freed.add(task)
            self._roomy()

    async def wait(self, within: float) -> None:
        """Until a batch's worth of slots is free, `open` is called, or `within` passed."""
        self._room = asyncio.Event()  # (one of the running loop's: a worker may run again)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), within)

    def open(self) -> None:
        """A `wait` ends now (the worker stops)."""
        self._room.set()

    def _roomy(self) -> None:
        if self.left() >= self.batch:
            self._room.set()
