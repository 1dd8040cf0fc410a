"""A Redis that accepts connections and never answers (a frozen VM, a proxy in front of a
dead node, a hostile sentinel naming such a node): a call fails with a Redis outage within
its timeouts and retries, it does not reconnect inside its own reconnection until Python
gives up (RecursionError after ~120 x DISPATCHER_REDIS_TIMEOUT, as it did while every
connection had a 30 s health check: a new connection's first command checked its health,
whose PING timed out, whose retry reconnected, whose first command...)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from dispatcher.connections import REDIS_ERRORS, connect, preflight
from dispatcher.embedded import EmbeddedRedis, SentinelGroup
from dispatcher.errors import InvalidSetting
from dispatcher.topology import check_shards
from tests.helpers import make_settings

GUARD_S = 50  # a failure guard: the whole call fails long before it otherwise


def _bulk(value: object) -> bytes:
    data = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


@pytest.fixture
async def fake_sentinel(silent: int) -> AsyncIterator[int]:
    """A sentinel that names `silent` as the master `dispatcher` (up, with two other
    sentinels and no replica) and answers +OK to anything else."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while line := await reader.readline():
            words = []
            for _ in range(int(line[1:])):
                size = int((await reader.readline())[1:])
                words.append((await reader.readexactly(size + 2))[:-2].decode().lower())
            if words[:2] == ["sentinel", "masters"]:
                master = ["name", "dispatcher", "ip", "127.0.0.1", "port", silent]
                master += ["flags", "master", "num-other-sentinels", 2, "quorum", 2]
                writer.write(b"*1\r\n*%d\r\n" % len(master) + b"".join(map(_bulk, master)))
            elif words[:2] in (["sentinel", "slaves"], ["sentinel", "replicas"]):
                writer.write(b"*0\r\n")
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    for writer in writers:
        writer.close()
    await server.wait_closed()


async def test_a_call_to_a_redis_that_never_answers_is_an_outage(silent: int) -> None:
    redis = connect(make_settings(f"redis://127.0.0.1:{silent}/0", redis_timeout=0.2))
    try:
        async with asyncio.timeout(GUARD_S):
            with pytest.raises(REDIS_ERRORS):
                await redis.ping()
    finally:
        await redis.aclose()


async def test_a_sentinel_naming_a_silent_master_does_not_wreck_the_preflight(
    sentinel_group: SentinelGroup, fake_sentinel: int
) -> None:
    """The fake sentinel listed first, before the group's: redis-py takes the first answer
    of a sentinel that knows the master, so the master is the silent node; the preflight
    waits it out as an outage (its `maxmemory-policy` check answers nothing), as it does a
    master that is down."""
    hosts = sentinel_group.url.split("://")[1].split("/")[0]
    url = f"redis+sentinel://127.0.0.1:{fake_sentinel},{hosts}/{sentinel_group.name}/0"
    settings = make_settings(url, redis_timeout=0.2)
    async with asyncio.timeout(GUARD_S):
        try:
            warnings = await preflight(settings)
        except InvalidSetting:
            pytest.fail("the sentinels are right: one of them names a master that is down")
    assert warnings == []


async def test_a_hung_sentinel_listed_first_leaves_the_master_answering_at_start(
    sentinel_group: SentinelGroup, silent: int
) -> None:
    """A sentinel that never answers, listed before the group's: redis-py asks the next
    one after its timeout and finds the master, so the start-up check finds it answering
    (a first version gave its PING one timeout in all, found the healthy master silent, and
    every command about a project then refused to run: review)."""
    hosts = sentinel_group.url.split("://")[1].split("/")[0]
    url = f"redis+sentinel://127.0.0.1:{silent},{hosts}/{sentinel_group.name}/0"
    async with asyncio.timeout(GUARD_S):
        found = await check_shards(make_settings(url, redis_timeout=0.3))
    assert found.silent == [], found


async def test_a_slow_redis_is_no_silent_one_at_start(
    shard_servers: list[EmbeddedRedis],
) -> None:
    """Each reply of two shards 0.3 s late at a 0.5 s timeout (a loaded or far server): the
    start-up check's PING answers as any command does, so a reordered list of them is still
    refused (a first version gave the PING one deadline for its connect, handshake and
    reply, found both silent and let the reordered list through: review)."""
    proxies = [await _late(int(server.port or 0), 0.3) for server in shard_servers]
    late = [f"redis://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/0" for proxy in proxies]
    fast = [server.url for server in shard_servers]
    for url in fast:
        redis = connect(make_settings(url))
        await redis.flushall()
        await redis.aclose()
    try:
        async with asyncio.timeout(GUARD_S):
            await check_shards(make_settings(fast[0], redis_shards=fast))  # marked in order
            found = await check_shards(make_settings(late[0], redis_shards=late, redis_timeout=0.5))
            assert found.silent == [], found
            with pytest.raises(InvalidSetting, match="the list was reordered"):
                await check_shards(
                    make_settings(late[1], redis_shards=late[::-1], redis_timeout=0.5)
                )
    finally:
        for proxy in proxies:
            proxy.close()


async def _late(port: int, delay: float) -> asyncio.Server:
    """A proxy to the Redis on `port` that holds each of its replies `delay` s."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", port)

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, hold: float
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    await asyncio.sleep(hold)
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream, 0), pipe(upstream_reader, writer, delay))

    return await asyncio.start_server(relay, "127.0.0.1", 0)
