"""A move's drain (`dispatcher.shards.drain`) when Redis fails mid-job, on two real shards
reached through a real TCP link (`Link`) that fails as a network does: a write whose
answer is lost, which redis-py sends again (its pipelines and commands are retried on a
connection error), and a shard unreachable for a while. The job is never on neither shard,
and once Redis answers again it is moved and let run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
import redis as sync_redis

from dispatcher.clock import now_ms
from dispatcher.embedded import EmbeddedRedis
from dispatcher.lua import Script, load_all
from dispatcher.services import Services
from dispatcher.shards.drain import Drain, Taken
from dispatcher.shards.queued import MOVER, DropHeld, PlaceJob, TakeJob
from dispatcher.shards.router import Router
from dispatcher.worker.claims import Claims
from tests.helpers import make_settings

JOB_ID = "mv:e.1@5"
JOB = orjson.dumps({  # a retry of one of project mv's deliveries: moved
    "t": None, "f": "deliver", "k": {}, "et": 0,
    "a": [{"callbackId": 1, "projectId": "mv", "deliveryId": "mv:e.1", "event": "BUILD_END",
           "body": "{}"}],
})  # fmt: skip


class Link:
    """A TCP proxy on 127.0.0.1 in front of one Redis server. `cut` fails the connection
    that next sends a given script: after Redis ran it, its answer lost (`landed`), or
    before Redis got it; then, `stays_down`, every new connection is refused until `down`
    is set False."""

    def __init__(self, server: EmbeddedRedis) -> None:
        assert server.port is not None
        self.to, self.url, self.sha = server.port, "", ""
        self.landed = self.stays_down = self.down = False
        self.connections: set[Connection] = set()

    def cut(self, script: type[Script], *, landed: bool, stays_down: bool = False) -> None:
        self.sha, self.landed, self.stays_down = script._lua.sha, landed, stays_down

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Link]:
        server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
        try:
            yield self
        finally:
            server.close()
            for connection in list(self.connections):
                connection.close()
            await asyncio.gather(*(c.done.wait() for c in list(self.connections)))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.to)
        connection = Connection(self, (writer, up_writer))
        self.connections.add(connection)
        try:
            with contextlib.suppress(OSError):
                await asyncio.gather(
                    connection.requests(reader, up_writer), connection.replies(up_reader, writer)
                )
        finally:
            self.connections.discard(connection)
            connection.done.set()


@dataclass(eq=False)
class Connection:
    """One client's connection through a `Link`, and its own to Redis."""

    link: Link
    ends: tuple[asyncio.StreamWriter, asyncio.StreamWriter]
    losing: bool = False  # the answer to the request sent last is lost
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self, cut: bool = False) -> None:
        if cut:
            self.link.sha, self.link.down = "", self.link.stays_down
        for end in self.ends:
            end.close()

    async def requests(self, reader: asyncio.StreamReader, to: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            if self.link.sha and self.link.sha.encode() in chunk:
                if not self.link.landed:
                    return self.close(cut=True)
                self.losing = True  # Redis runs it; its answer is lost
            to.write(chunk)
            await to.drain()
        self.close()

    async def replies(self, reader: asyncio.StreamReader, to: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            if self.losing:
                return self.close(cut=True)
            to.write(chunk)
            await to.drain()
        self.close()


@contextlib.asynccontextmanager
async def linked_shards(shard_servers: list[EmbeddedRedis]) -> AsyncIterator[list[Link]]:
    """A link to each of the two shards, emptied."""
    for server in shard_servers:
        sync_redis.Redis.from_url(server.url).flushall()
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Link(s).serving()) for s in shard_servers]


def _router(links: list[Link]) -> contextlib.AbstractAsyncContextManager[Router]:
    urls = [link.url for link in links]
    return Router.open(make_settings(urls[0], redis_shards=urls, placement_refresh=0.05))


async def _queue_job(src: Services, dst: Services, due: int) -> None:
    """The job queued on the old shard, and the scripts loaded on both (so that a script
    sent is run, not answered NOSCRIPT)."""
    for services in (src, dst):
        await load_all(services.redis)
    await src.redis.set(src.keys.arq_job(JOB_ID), JOB, px=60_000)
    await src.redis.zadd(src.keys.QUEUE, {JOB_ID: due})


async def _moved_and_free(src: Services, dst: Services, due: int) -> None:
    """The job is gone from the old shard, queued on the new one due when it was, and a
    worker there claims it."""
    k = src.keys
    assert await src.redis.zscore(k.QUEUE, JOB_ID) is None
    assert not await src.redis.exists(k.arq_job(JOB_ID), k.ARQ_IN_PROGRESS_PREFIX + JOB_ID)
    assert await dst.redis.zscore(dst.keys.QUEUE, JOB_ID) == due
    worker = Claims(dst.redis, dst.keys, "worker", lease_s=30)
    assert [claimed.job_id for claimed in await worker.claim(1)] == [JOB_ID]


WRITES: dict[str, tuple[type[Script], int]] = {
    "its take": (TakeJob, 0),  # (the script, the shard it runs on: 0 old, 1 new)
    "its copy's placement": (PlaceJob, 1),
    "its removal from the old shard": (DropHeld, 0),
}


@pytest.mark.parametrize("write", list(WRITES))
async def test_a_write_of_a_jobs_move_sent_again_answers_as_it_did(
    shard_servers: list[EmbeddedRedis], write: str
) -> None:
    """One write of a job's move lands, its answer is lost as the link fails, and redis-py
    sends it again on a new connection: the write answers as it did the first time, and
    the job moves. Before, the take sent again found the mover's own lease ("a worker
    holds it": the job waited out that lease); the placement found the copy queued
    already and left it held (not due until its hold lapsed, 60 s); and the removal
    found the mover's lease gone, so the mover took the job for a worker's and removed
    its copy: the job was on neither shard."""
    script, on = WRITES[write]
    async with linked_shards(shard_servers) as links, _router(links) as router:
        src, dst = router.shards
        due = now_ms() - 1_000
        await _queue_job(src, dst, due)
        drain = Drain(src, dst, "mv", MOVER + "a", lambda: None, lambda _: None)
        links[on].cut(script, landed=True)
        assert await drain.move_job(JOB_ID, JOB, unless_begun=False) is True
        assert not links[on].sha  # it was cut
        await _moved_and_free(src, dst, due)


class LinkBackAfter(Drain):
    """A drain whose link to a shard is down from one write of a job's move (`links[on]`
    cut as `script` is sent) until that write failed."""

    links: list[Link]
    on = 0

    async def place(self, taken: Taken) -> bool | None:
        try:
            return await super().place(taken)
        finally:
            self.links[self.on].down = False

    async def _leave(self, taken: Taken) -> bool:
        try:
            return await super()._leave(taken)
        finally:
            self.links[self.on].down = False


@pytest.mark.parametrize("write", ["its copy's placement", "its removal from the old shard"])
@pytest.mark.parametrize("landed", [True, False], ids=["landed", "never got there"])
async def test_a_job_whose_move_redis_failed_is_moved_on_the_next_pass(
    shard_servers: list[EmbeddedRedis], write: str, landed: bool
) -> None:
    """The link to a shard fails as the job's copy is placed, or as the job is removed from
    the old shard, the write run there or not, and stays down through redis-py's tries:
    the write raises. The mover leaves the copy held (it may be the job's only one) and
    the job under its lease, says so, and goes on; its next pass moves the job: taken
    again and placed again (its own lease, its own copy), or its removal made again and
    the copy let run. Before, the error stopped the move: the job was on both shards, to
    run on each once its lease (old) and its hold (new) lapsed, or held on the new one
    alone until its hold lapsed."""
    script, on = WRITES[write]
    async with linked_shards(shard_servers) as links, _router(links) as router:
        src, dst = router.shards
        due = now_ms() - 1_000
        await _queue_job(src, dst, due)
        said: list[str] = []
        drain = LinkBackAfter(src, dst, "mv", MOVER + "a", lambda: None, said.append, 0.1)
        drain.links, drain.on = links, on
        links[on].cut(script, landed=landed, stays_down=True)
        assert await drain.run() == 1
        assert not links[on].sha  # it was cut
        assert any(f"job {JOB_ID} not " in line for line in said)
        assert drain.unsettled == {}
        await _moved_and_free(src, dst, due)
