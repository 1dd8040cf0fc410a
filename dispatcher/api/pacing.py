"""What one project's HTTP emits may queue, per API process: a token bucket of bytes per
project (`EmitPace`), refilled at `DISPATCHER_EMIT_PROJECT_RATE` bytes a second up to
`DISPATCHER_EMIT_PROJECT_BURST`; each emit request costs its body's bytes (1 KiB at
least: a flood of tiny events costs Redis more than their bytes). Past it the request is a
429 with `Retry-After`, and nothing of it is queued: one project cannot fill the Redis every
project shares faster than that, whatever its events' size, while others emit as usual.
Python producers (the platform's own code) are not paced."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from dispatcher.api.deps import ProjectPath
from dispatcher.errors import TooManyRequests
from dispatcher.models import check_project_id

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["SMALLEST_COST", "EmitPace", "Paced"]

SMALLEST_COST = 1024  # bytes an emit request costs at least


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class EmitPace:
    """Per project, the bytes its emits may still queue now; the `most` projects seen last
    are kept (one forgotten starts again with a full bucket)."""

    def __init__(self, rate: float, burst: float, most: int = 10_000) -> None:
        self.rate, self.burst, self.most = rate, burst, most
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def of(cls, settings: Settings) -> EmitPace | None:
        """The pace `settings` ask for; None when it is off (a rate of 0)."""
        rate = settings.emit_project_rate
        return cls(rate, settings.emit_project_burst) if rate else None

    def take(self, project_id: str, cost: int, now: float | None = None) -> float:
        """Spend `cost` bytes of the project's bucket: 0 when taken, else the seconds until
        it holds them (nothing spent)."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(project_id, None) or _Bucket(self.burst, now)
        self._buckets[project_id] = bucket
        if len(self._buckets) > self.most:
            self._buckets.popitem(last=False)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self.rate


async def _paced(request: Request, project_id: ProjectPath) -> None:
    """Spend the request's bytes from its project's bucket, or refuse it (429); a project
    id that cannot emit is its 400 first."""
    pace: EmitPace | None = getattr(request.app.state, "emit_pace", None)
    if pace is None:
        return
    check_project_id(project_id)
    wait = pace.take(project_id, max(len(await request.body()), SMALLEST_COST))
    if wait:
        raise TooManyRequests(
            f"project {project_id} emits faster than its share: "
            f"{pace.rate:,.0f} bytes a second (DISPATCHER_EMIT_PROJECT_RATE, in bursts of "
            f"{pace.burst:,.0f}); nothing of this request was queued, send it again in "
            f"{math.ceil(wait)} s",
            retry_after=wait,
        )


Paced = Annotated[None, Depends(_paced)]
