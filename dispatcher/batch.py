"""Group commit for Redis: the writes and reads of many concurrent jobs share one pipeline.

A worker runs up to `max_jobs` deliveries at once, and each needs a lookup before its
request and a write after it. Sent one by one, every one costs a round trip with its
syscalls and event-loop wake-ups, which measured as the largest part of a delivery's CPU.
Here each caller queues its commands and waits; whatever arrives within one short window
goes out in a single pipeline, and every caller gets its own results (or the error) back.
Nothing is acknowledged before Redis has answered, so durability is unchanged.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError

from dispatcher.lua import first_error, load_all
from dispatcher.stopping import retrieved

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from dispatcher.history.record import AttemptRecord
    from dispatcher.lua import Script
    from dispatcher.replication import Replication

__all__ = ["TOGETHER_MAX", "Batcher", "Pending", "QueueCommands", "leads_of", "run_shared"]

QueueCommands = Callable[["Pipeline"], None]
# Calls of one script run by one call (`Script.queue_together`): one call instead of one
# each, few enough that Redis keeps serving others between them (about 1 ms of its time).
TOGETHER_MAX = 50
# Where a lead's answer is: its call's place in the pipeline, and its own place in that
# call's answer.
Place = tuple[int, int]


@dataclass(slots=True)
class Pending:
    """Commands waiting for the next pipeline: the records they write (given their ids
    first by a `Writer`), the future their answers go to, and the script that `lead` makes
    (once the records have their ids), then the script `tail`, both `TOGETHER` ones, run
    with the batch's others of their kind before any commands (see `Batcher`)."""

    queue: QueueCommands
    done: asyncio.Future[list[Any]]
    records: Sequence[AttemptRecord] = ()
    lead: Callable[[], Script] | None = None
    tail: Script | None = None


class Batcher:
    """Coalesces `execute()` calls made within `window` seconds into one pipeline. With
    `window=0` a lone caller waits for nothing: the calls made in the same turn of the
    event loop (the requests it read together, say) share a pipeline. With `replication`,
    each pipeline ends with one WAIT for its replicas, and every caller of a pipeline they
    did not confirm in time gets `NotReplicated`. This is the project's one group commit:
    the worker's durable `Writer` is a Batcher that sends a batch again until Redis takes
    it. A caller's `lead` (and `tail`) scripts run together with the batch's others of
    their kind, one call per `TOGETHER_MAX` (`lua.Script.queue_together`), every caller's
    first before any second one, all before the callers' own commands in the order
    queued; their answers come first in the caller's."""

    def __init__(
        self,
        redis: Redis,
        *,
        window: float = 0.0005,
        max_batch: int = 500,
        replication: Replication | None = None,
    ) -> None:
        self.redis = redis
        self.window = window
        self.max_batch = max_batch
        self.replication = replication
        self._pending: list[Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    def submit(
        self,
        queue: QueueCommands,
        records: Sequence[AttemptRecord] = (),
        lead: Callable[[], Script] | None = None,
        tail: Script | None = None,
    ) -> asyncio.Future[list[Any]]:
        """Queue the commands `queue` puts on a pipeline; the future gets their results.
        `lead`: what makes the script (a `TOGETHER` one; a `Writer`'s writes `records`,
        made once they have their ids); `tail`, one that follows it (with a `lead` only):
        both run with the batch's others before `queue`'s commands, their answers first."""
        if tail is not None and lead is None:
            raise ValueError("a tail follows a lead: give both, or queue it with the commands")
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        done.add_done_callback(retrieved)  # a caller that stopped waiting (a writer's never
        # waits: the writer logs a refused write itself) leaves no warning behind
        self._pending.append(Pending(queue, done, records, lead, tail))
        self._queued()
        return done

    async def together(self, script: Script) -> Any:
        """Run `script` (a `TOGETHER` one) in the next pipeline, as one call with the
        others of its kind queued meanwhile; returns its answer, or raises its error."""
        (answer,) = await self.submit(_nothing, lead=lambda: script)
        return answer

    def _queued(self) -> None:
        """A write joined the pending ones: see that it is sent."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_soon())

    async def execute(self, queue: QueueCommands) -> list[Any]:
        """Run the commands `queue` puts on a pipeline, batched with others; returns their
        results in order. Raises what the pipeline raised. The commands must be safe to send
        again next to a script that answered NOSCRIPT (which did not run)."""
        future = self.submit(queue)
        if len(self._pending) >= self.max_batch:  # shielded: a caller cancelled meanwhile
            await asyncio.shield(self._flush())  # must not leave the others unanswered
        return await future

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.window)
        self._flusher = None
        await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            answers = await self._sent(batch)
        except Exception as exc:  # the connection failed: every caller gets the error
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(exc)
            return
        for pending, mine in zip(batch, answers, strict=True):
            if pending.done.done():
                continue
            if (error := first_error(mine)) is not None:
                pending.done.set_exception(error)
            else:
                pending.done.set_result(mine)

    async def _sent(self, batch: list[Pending]) -> list[list[Any]]:
        """One pipeline for `batch`: the joint calls of its leads, then each one's own
        commands; each one's answers with its leads' first (or their call's error)."""
        leads, places = _joint_calls([leads_of(pending) for pending in batch])
        sent = await self.send([*leads, *(pending.queue for pending in batch)])
        led, answers = sent[: len(leads)], sent[len(leads) :]
        for answer, mine in zip(answers, places, strict=True):
            calls = [(led[call][0], place) for call, place in mine]
            answer[0:0] = [got if isinstance(got, Exception) else got[i] for got, i in calls]
        return answers

    async def send(self, queues: list[QueueCommands]) -> list[list[Any]]:
        """One pipeline for all `queues`, errors left in place, one answer list per queue.
        When Redis lost its scripts (a restart) they are loaded, and the queues they
        failed in are sent again."""
        answers = await self._send(queues)
        retry = [i for i, mine in enumerate(answers) if _noscript(mine)]
        if retry:
            await load_all(self.redis)
            again = await self._send([queues[i] for i in retry])
            for i, mine in zip(retry, again, strict=True):
                answers[i] = mine
        return answers

    async def _send(self, queues: list[QueueCommands]) -> list[list[Any]]:
        if self.replication is None:
            return await run_shared(self.redis, queues)
        answers = await run_shared(self.redis, [*queues, self.replication.queue_on])
        self.replication.check(answers.pop())
        return answers


async def run_shared(redis: Redis, queues: list[QueueCommands]) -> list[list[Any]]:
    """One pipeline for all `queues`, errors left in place; the results cut back into one
    list per queue."""
    if not queues:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        sizes = []
        for queue in queues:
            before = len(pipe)
            queue(pipe)
            sizes.append(len(pipe) - before)
        results: list[Any] = await pipe.execute(raise_on_error=False)
    out, start = [], 0
    for size in sizes:
        out.append(results[start : start + size])
        start += size
    return out


def leads_of(write: Pending) -> tuple[Script, ...]:
    """A write's scripts for the joint calls, in order."""
    if write.lead is None:
        return ()
    return (write.lead(),) if write.tail is None else (write.lead(), write.tail)


def _joint_calls(
    leads: list[Sequence[Script]],
) -> tuple[list[QueueCommands], list[list[Place]]]:
    """The calls that run each write's `leads` (`TOGETHER` scripts): every write's first
    before any second one, those of one kind together, `TOGETHER_MAX` at most per call,
    in the order given; and where each write's lead answers will be (see `Place`)."""
    kinds: dict[tuple[int, type[Script]], list[tuple[int, Script]]] = {}
    for i, scripts in enumerate(leads):
        for rank, lead in enumerate(scripts):
            kinds.setdefault((rank, type(lead)), []).append((i, lead))
    calls: list[QueueCommands] = []
    places: list[list[Place]] = [[] for _ in leads]
    for rank, kind in sorted(kinds, key=lambda k: k[0]):  # stable: first seen first
        members = kinds[rank, kind]
        for start in range(0, len(members), TOGETHER_MAX):
            run = members[start : start + TOGETHER_MAX]
            calls.append(functools.partial(kind.queue_together, calls=[lead for _, lead in run]))
            for place, (i, _) in enumerate(run):
                places[i].append((len(calls) - 1, place))
    return calls, places


def _nothing(pipe: Pipeline) -> None:
    """No commands of its own (a caller whose lead is all it sends)."""


def _noscript(results: list[Any]) -> bool:
    return any(isinstance(r, NoScriptError) for r in results)
