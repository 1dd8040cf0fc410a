"""The shards the settings name, their clients, and the check each one gets at start-up.

- One Redis URL (a server, or a Sentinel group): one shard, today's keys exactly.
- `DISPATCHER_REDIS_SHARDS`: one shard per URL, in the list's order, each with today's key
  names on its own server.
- A `redis+cluster://` URL: `DISPATCHER_REDIS_CLUSTER_SHARDS` shards on one cluster client,
  each under its own hash tag (`Keys.of_cluster_shard`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.exceptions import AuthenticationError

from dispatcher.cluster import is_cluster_url
from dispatcher.connections import REDIS_ERRORS, connect, preflight, require_url, shown
from dispatcher.errors import InvalidSetting
from dispatcher.keys import Keys
from dispatcher.lua import Key, Script
from dispatcher.placement import Placement
from dispatcher.shard import Shard

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from dispatcher.settings import Settings

__all__ = ["Checked", "check_shards", "close_all", "connect_shards", "shards_of"]


@dataclass
class ClaimPosition(Script):
    """Marks a shard's server with the shard's position; returns the position marked first
    (the one it marks now, if none): a server listed at another position is refused."""

    LUA = """
    local marked = redis.call('GET', mark)
    if marked then return marked end
    redis.call('SET', mark, position)
    return position
    """
    mark: Key
    position: int


def shards_of(settings: Settings) -> list[Shard]:
    """Every shard of the settings, by position."""
    if settings.redis_shards:
        return [
            Shard(index, Keys(settings.queue_name), url)
            for index, url in enumerate(settings.redis_shards)
        ]
    url = require_url(settings)
    if is_cluster_url(url):
        return [
            Shard(index, Keys.of_cluster_shard(settings.queue_name, index), url, cluster=True)
            for index in range(settings.redis_cluster_shards)
        ]
    return [Shard.single(settings.queue_name, url)]


def connect_shards(settings: Settings, shards: list[Shard]) -> list[Redis]:
    """A client per shard (the shards of one cluster share one client)."""
    clients: dict[str, Redis] = {}
    return [
        clients.setdefault(shard.url, connect(settings, shard.url))
        if shard.cluster
        else connect(settings, shard.url)
        for shard in shards
    ]


async def close_all(clients: list[Redis]) -> None:
    """Close each distinct client once."""
    for client in {id(c): c for c in clients}.values():
        await client.aclose()


@dataclass
class Checked:
    """What the start-up check found: `warnings` to show, and the positions of the shards
    whose Redis did not answer (`silent`: the check asked them nothing more)."""

    warnings: list[str] = field(default_factory=list)
    silent: list[int] = field(default_factory=list)


async def check_shards(settings: Settings) -> Checked:
    """What a process checks at start: each URL's `preflight`, side by side with a PING of
    each (`DISPATCHER_REDIS_TIMEOUT`); then, of the servers that answered it (a silent one
    is asked nothing more: each check waited its own timeouts for it, one after the other,
    and a CLI command five before it said so), with more than one shard, that each sits at
    the position it had (a reordered list would hand projects to the wrong shard), marking
    new ones and starting their id ranges; and, with one URL too, that the home shard does
    not say more shards are in use than listed (a process given some of them would act on
    the wrong one). InvalidSetting when not."""
    shards = shards_of(settings)
    urls = list(dict.fromkeys(shard.url for shard in shards))
    answered, checks = await asyncio.gather(
        _answering(settings, urls), asyncio.gather(*(preflight(settings, u) for u in urls))
    )
    live = {url for url, up in zip(urls, answered, strict=True) if up}
    found = Checked(
        [w for said in checks for w in said], [s.index for s in shards if s.url not in live]
    )
    for url in urls:  # one line per server (a cluster's shards share one)
        if url not in live:
            which = [s for s in shards if s.url == url]
            said = f"{which[0]} ({shown(url)})" if len(which) < len(shards) else shown(url)
            found.warnings.append(f"{said} did not answer within DISPATCHER_REDIS_TIMEOUT")
    clients = connect_shards(settings, shards)
    asked = [(s, c) for s, c in zip(shards, clients, strict=True) if s.url in live]
    try:
        if len(shards) > 1:
            for shard, client in asked:  # all read, then marked
                _in_place(shard, await _mark_of(shard, client))
            for shard, client in asked:
                found.warnings += await _claim(shard, client)
        if shards[0].url in live:
            found.warnings += await _in_use(shards, clients[0])
    finally:
        await close_all(clients)
    return found


async def _answering(settings: Settings, urls: list[str]) -> list[bool]:
    """Whether each URL's Redis answers a PING, all asked at once, each as any command
    (each step within the timeout: a sentinel that hangs, then one that answers, or a slow
    server, answer; one deadline for the whole found them silent: review). InvalidSetting
    when one refuses the password its URL gives (or asks for one): a worker waited it out
    as an outage for ever, a line a second, and the CLI said the server did not answer
    (review)."""

    setting = "DISPATCHER_REDIS_SHARDS" if settings.redis_shards else "DISPATCHER_REDIS_URL"

    async def answers(url: str) -> bool:
        redis = connect(settings, url)
        try:
            await redis.ping()
        except AuthenticationError as exc:  # (a ConnectionError: it was waited out as one)
            raise InvalidSetting(
                f"{shown(url)} refused its password ({exc}): give the URL the right one",
                param=setting,
            ) from None
        except REDIS_ERRORS:  # (TimeoutError among them: an OSError)
            return False
        finally:
            await redis.aclose()
        return True

    return list(await asyncio.gather(*(answers(url) for url in urls)))


async def _in_use(shards: list[Shard], home: Redis) -> list[str]:
    """InvalidSetting when the home shard says more shards are in use than listed; a
    warning when fewer are."""
    placement = Placement(len(shards), home, shards[0].keys)
    with contextlib.suppress(*REDIS_ERRORS):
        await placement.load()  # InvalidSetting when too few are listed
        if placement.active < len(shards):
            return [
                f"{len(shards)} shards are listed, {placement.active} in use: run "
                "`dispatcher shards grow` once the list is on every process"
            ]
    return []


async def _mark_of(shard: Shard, client: Redis) -> bytes | None:
    """The position `shard`'s server was marked with (None: none yet, or no answer)."""
    try:
        marked: bytes | None = await client.get(shard.keys.SHARD)
    except REDIS_ERRORS:  # an outage: `_claim` says so
        return None
    return marked


async def _claim(shard: Shard, client: Redis) -> list[str]:
    """Mark `shard`'s server with its position unless marked; InvalidSetting when it holds
    another. The marks are all read first (`_in_place`): a list refused after it marked a
    new server left that mark, and the corrected list was refused too (review)."""
    try:
        marked = await ClaimPosition(mark=shard.keys.SHARD, position=shard.index).run(client)
    except REDIS_ERRORS as exc:  # an outage, waited out by whoever uses it
        return [f"{shard} ({shown(shard.url)}) did not answer: {exc}"]
    _in_place(shard, marked)
    return []


def _in_place(shard: Shard, marked: bytes | int | None) -> None:
    """InvalidSetting unless `shard`'s server is unmarked or marked with its position."""
    if marked is not None and int(marked) != shard.index:
        raise InvalidSetting(
            f"the Redis at position {shard.index} ({shown(shard.url)}) holds shard "
            f"{int(marked)}: the list was reordered; shards keep their positions, and new ones "
            "go at the end",
            param="DISPATCHER_REDIS_SHARDS",
        )
