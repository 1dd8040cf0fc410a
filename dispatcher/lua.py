"""Lua scripts without redis-py's per-pipeline `SCRIPT EXISTS` round trip.

redis-py checks every script of a pipeline with an extra round trip each time the pipeline
runs. Here a script is sent by its SHA; when Redis answers NOSCRIPT (it restarted, or never
saw the script) every script is loaded and the call is made again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

__all__ = ["Lua", "run_pipeline"]

Arg = str | bytes | int | float


class Lua:
    """One script, by its source. Instances are module constants."""

    scripts: ClassVar[list[Lua]] = []

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        Lua.scripts.append(self)

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run now (one round trip; two after a Redis restart)."""
        try:
            return await redis.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self.sha, len(keys), *keys, *args
            )
        except NoScriptError:
            await load_all(redis)
            return await redis.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self.sha, len(keys), *keys, *args
            )

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Queue on `pipe`; run it with `run_pipeline` (or a Batcher), which handles NOSCRIPT."""
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


async def load_all(redis: Redis) -> None:
    for script in Lua.scripts:
        await redis.script_load(script.source)


def first_error(results: Sequence[Any]) -> Exception | None:
    return next((r for r in results if isinstance(r, Exception)), None)


async def run_pipeline(redis: Redis, queue: Callable[[Pipeline], None]) -> list[Any]:
    """Run the commands `queue` puts on a pipeline, in one round trip. The commands must be
    safe to send again next to a script that answered NOSCRIPT (which did not run)."""
    for tries_left in (1, 0):
        async with redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        if tries_left and any(isinstance(r, NoScriptError) for r in results):
            await load_all(redis)
            continue
        if (error := first_error(results)) is not None:
            raise error
        return results
    raise AssertionError("unreachable")
