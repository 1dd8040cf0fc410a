"""A Redis that accepts connections and never answers (a frozen VM, a proxy in front of a
dead node, a hostile sentinel naming such a node): a call fails with a Redis outage within
its timeouts and retries, it does not reconnect inside its own reconnection until Python
gives up (RecursionError after ~120 x DISPATCHER_REDIS_TIMEOUT, as it did while every
connection had a 30 s health check: a new connection's first command checked its health,
whose PING timed out, whose retry reconnected, whose first command...)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from dispatcher.connections import REDIS_ERRORS, connect, preflight
from dispatcher.embedded import SentinelGroup
from dispatcher.errors import InvalidSetting
from tests.helpers import make_settings

GUARD_S = 50  # a failure guard: the whole call fails long before it otherwise


@pytest.fixture
def silent() -> Iterator[int]:
    """A port on 127.0.0.1 whose connections the kernel accepts (a listening socket's
    backlog) and nobody ever reads or answers."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    yield listener.getsockname()[1]
    listener.close()


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
