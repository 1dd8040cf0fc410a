"""A project's jobs left queued on a shard, found by their ids, as a move's drain
(`dispatcher.shards.drain`) and `dispatcher shards forget` look for them.

Today's job ids start with their project (`{project}:...`: `dispatcher.jobs`), so a scan
of the queue matching that prefix finds them without reading any other project's job.
A ZSCAN returns every member present from its start to its end, whatever leaves or
joins the queue meanwhile (a member may come twice: each is given once); pages read by
position (ZRANGE) passed over the job at a page's boundary whenever jobs ahead of it
left between two reads. A version before scoped ids named a job by its event id alone:
an id without `:` can be no other project's of today, so those are read too (their
bytes, as the project's own, in pages of at most `PAGE_BYTES`) while the shard has any;
the first pass of a `Scan` reads every id to know (ids only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dispatcher.keys import SEP
from dispatcher.shards.holdings import glob_escaped
from dispatcher.shards.lanes import lanes_left, ordered_on
from dispatcher.shards.queued import where_to

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from dispatcher.services import Services

__all__ = ["PAGE_BYTES", "Scan", "left_on", "to_drain"]

COUNT = 1000  # queue members a ZSCAN call looks at
PAGE_BYTES = 1 << 20  # job bytes one read asks for (a bigger job is read alone)


@dataclass
class Scan:
    """The jobs of `project` queued on the shard of `services`, pass after pass (`jobs`)."""

    services: Services
    project: str
    # whether the queue held ids of the version before scoped ids at the last pass
    # (None: not known yet: the first pass reads every id)
    legacy: bool | None = field(default=None, init=False)

    async def jobs(self) -> AsyncIterator[tuple[str, bytes | None]]:
        """One pass: each of the project's job ids (and each unscoped one), once, with
        its bytes (None: gone since)."""
        redis, queue, mine = self.services.redis, self.services.keys.QUEUE, f"{self.project}:"
        match = None if self.legacy is not False else glob_escaped(mine) + "*"
        found, legacy, page = set(), False, []
        async for member, _ in redis.zscan_iter(queue, match=match, count=COUNT):
            job_id = member.decode()
            unscoped = SEP not in job_id
            legacy |= unscoped
            if job_id in found or not (unscoped or job_id.startswith(mine)):
                continue
            found.add(job_id)
            page.append(job_id)
            if len(page) >= COUNT:
                async for job in self._read(page):
                    yield job
                page = []
        async for job in self._read(page):
            yield job
        if match is None:
            self.legacy = legacy

    async def _read(self, job_ids: list[str]) -> AsyncIterator[tuple[str, bytes | None]]:
        """The jobs' bytes, `PAGE_BYTES` at most a read (their sizes read first)."""
        if not job_ids:
            return
        redis, k = self.services.redis, self.services.keys
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.strlen(k.arq_job(job_id))
            sizes = await pipe.execute()
        batches: list[list[str]] = [[]]
        taken = 0
        for job_id, size in zip(job_ids, sizes, strict=True):
            if batches[-1] and taken + size > PAGE_BYTES:
                batches.append([])
                taken = 0
            batches[-1].append(job_id)
            taken += size
        for batch in batches:
            datas = await redis.mget([k.arq_job(job_id) for job_id in batch])
            for pair in zip(batch, datas, strict=True):
                yield pair


async def left_on(services: Services, project: str) -> int:
    """The project's jobs queued on a shard (its ids are `{project}:...`), and its lanes."""
    of_project = glob_escaped(f"{project}:") + "*"
    jobs = 0
    async for _ in services.redis.zscan_iter(services.keys.QUEUE, match=of_project, count=COUNT):
        jobs += 1
    return jobs + await lanes_left(services, project)


async def to_drain(services: Services, project: str) -> int:
    """The project's jobs on a shard that a drain of it moves or waits for
    (`queued.where_to`), and its lanes: none once a drain is done."""
    ordered, left = await ordered_on(services, project), 0
    async for _, data in Scan(services, project).jobs():
        left += data is not None and bool(where_to(data, project, ordered))
    return left + await lanes_left(services, project)
