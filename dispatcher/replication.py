"""Replicated acknowledgements: with `DISPATCHER_REDIS_MIN_REPLICAS` = N > 0, what the
service acknowledges to a producer (an emit, a redelivery) is on N replicas first, as
Kafka's `acks=all` with `min.insync.replicas` or a RabbitMQ quorum queue's confirms.

The pipeline that queues the jobs ends with `INCR dispatcher:replication:mark` and
`WAIT N timeout`: one WAIT per pipeline, however many events share it (group commit). WAIT
confirms the writes of its own connection up to its last write; the mark is that last
write, so WAIT covers everything the master held when the pipeline ran, including a job an
earlier try queued (a job already there changes nothing, and alone would leave WAIT with
nothing to wait for).

The worker's own writes (records, progress, job ends) are not waited for: a record is
written before its delivery's progress and its job's end, in one pipeline, and a replica
holds a prefix of what the master wrote, so a failover leaves either both or a job still
queued, whose attempt is made again (same delivery id) and recorded then. Waiting would
only stop deliveries whenever a replica is away (after a failover, until the old master
is back), for fewer repeats.

A shard move's writes are waited for (`confirm`, `dispatcher.shards.drain`): what it writes
to the new shard replaces what it then removes from the old one.

What WAIT N guarantees depends on how many replicas there are. With N = every replica, no
failover loses an acknowledged write: whichever replica is promoted confirmed it. With
fewer, a crash of the master loses none (the sentinels promote the replica with the highest
replication offset, which holds all that N confirmed), but a planned failover (`SENTINEL
FAILOVER`) or a partition may: the master stays up, and until the sentinels repoint it and
the replicas not promoted, they go on confirming writes that the promoted one never gets
(157 of 2,072 emits, one every 5 ms, in one failover; review). Start-up says so
(`sentinel_replicas`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dispatcher.errors import NotReplicated
from dispatcher.lua import run_pipeline

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.keys import Keys
    from dispatcher.settings import Settings

__all__ = [
    "WAIT_CAP_S",
    "Replication",
    "confirm",
    "plain_replicas",
    "run_replicated",
    "sentinel_replicas",
]

WAIT_CAP_S = 1.0  # one WAIT's bound; a producer tries again until DISPATCHER_EMIT_WAIT
SETTING = "DISPATCHER_REDIS_MIN_REPLICAS"


class Replication:
    """How many replicas confirm an acknowledged write, and how long one WAIT may take."""

    def __init__(self, replicas: int, wait_s: float, mark: str) -> None:
        self.replicas = replicas
        self.mark = mark  # the shard's replication mark (keys.REPLICATION_MARK)
        self.wait_ms = max(1, int(wait_s * 1000))

    @classmethod
    def of(cls, settings: Settings, keys: Keys) -> Replication | None:
        """The settings' replication; None without (`DISPATCHER_REDIS_MIN_REPLICAS=0`).
        One WAIT stays well inside the read timeout of its connection and inside a
        producer's `DISPATCHER_EMIT_WAIT`."""
        if not settings.redis_min_replicas:
            return None
        wait_s = min(WAIT_CAP_S, settings.redis_timeout / 2, settings.emit_wait / 2)
        return cls(settings.redis_min_replicas, wait_s, keys.REPLICATION_MARK)

    def queue_on(self, pipe: Pipeline) -> None:
        """Queue the mark and the WAIT on `pipe`, after the writes to confirm."""
        pipe.incr(self.mark)
        pipe.execute_command("WAIT", self.replicas, self.wait_ms)

    def check(self, answers: list[Any]) -> None:
        """The answers of `queue`'s two commands: NotReplicated unless enough replicas
        confirmed."""
        confirmed = answers[-1]
        if isinstance(confirmed, Exception):
            raise confirmed
        if int(confirmed) < self.replicas:
            raise NotReplicated(
                f"only {confirmed} of {self.replicas} replicas ({SETTING}) confirmed the "
                f"write within {self.wait_ms} ms",
                confirmed=int(confirmed),
                wanted=self.replicas,
            )


async def run_replicated(
    redis: Redis, queue: Callable[[Pipeline], None], replication: Replication | None
) -> list[Any]:
    """`run_pipeline` of `queue`, confirmed by `replication`'s replicas when there is one
    (NotReplicated otherwise: the writes are on the master, not yet on enough replicas);
    returns the answers of `queue`'s commands."""
    if replication is None:
        return await run_pipeline(redis, queue)

    def queue_and_wait(pipe: Pipeline) -> None:
        queue(pipe)
        replication.queue_on(pipe)

    answers = await run_pipeline(redis, queue_and_wait)
    replication.check(answers)
    return answers[:-2]


async def confirm(redis: Redis, replication: Replication | None) -> None:
    """Wait until `replication`'s replicas hold every write the master held so far, by any
    connection (the mark and WAIT alone); NotReplicated otherwise. Nothing without one."""
    if replication is not None:
        await run_replicated(redis, lambda _: None, replication)


def sentinel_replicas(master: str, replicas: list[dict[str, Any]], wanted: int) -> list[str]:
    """What start-up says of the `replicas` the sentinels list for `master` (described),
    `wanted` of them asked to confirm every emit: warnings when fewer are up (emits and
    callback changes refused meanwhile), or when more are up (a planned failover or a
    partition may then lose acknowledged emits). Only replicas up count: the sentinels keep
    a replaced node's address, down, until `SENTINEL RESET`, and counting it advised a
    value no group could meet (review). Fewer listed than wanted was a configuration error
    (exit 2), which after a replica's loss crash-looped every process, workers too, whose
    writes wait for no replica (review): a plain URL's check warns the same."""
    if not wanted:
        return []
    down = ("is_sdown", "is_odown", "is_disconnected")
    up = [r for r in replicas if not any(r.get(flag) for flag in down)]
    warnings = []
    if len(up) < wanted:
        warnings.append(
            f"{SETTING}={wanted}, but only {len(up)} of the {len(replicas)} replicas the "
            f"sentinels list for {master} are up: emits and callback changes are refused "
            "(503) until enough are back"
        )
    if len(up) > wanted:
        warnings.append(
            f"{SETTING}={wanted}, but {len(up)} replicas of {master} are up: a crash of the "
            "master loses nothing acknowledged, but a planned failover (SENTINEL FAILOVER) "
            "or a partition may lose emits acknowledged between the promotion and the "
            "moment the sentinels repoint the other nodes (the old master and a replica not "
            f"promoted go on confirming them); set it to {len(up)} to lose nothing in any "
            "failover (emits then answer 503 while a replica is down)"
        )
    return warnings


def plain_replicas(info: dict[str, Any], wanted: int) -> list[str]:
    """What start-up says of a plain URL's Redis (its `INFO replication`), `wanted`
    replicas asked to confirm every emit: a warning when it is a master with fewer
    connected (emits refused until they connect: after a managed failover the new primary
    may have none for minutes, and refusing to start stopped every process, workers too,
    whose writes wait for no replica)."""
    connected = int(info.get("connected_slaves", 0))
    if not wanted or info.get("role") != "master" or connected >= wanted:
        return []
    return [
        f"{SETTING}={wanted}, but the Redis of DISPATCHER_REDIS_URL has {connected} "
        "replica(s) connected: emits are refused (503) until enough connect"
    ]
