"""The history schema brought up to date by the API and the workers themselves.

The step before the API's start (`dispatcher db upgrade --if-reachable`: the init
container, systemd's `ExecStartPre`) only warns when PostgreSQL is unreachable, so that an
API restart during an outage starts. A rollout with a new migration during an outage then
left the schema behind for good: history reads answered 503, every shipper failed at its
start and tried again for ever, the Redis backlog grew to its limit and every worker
stopped claiming, until someone ran `dispatcher db upgrade` by hand (review).

Now each API process (its lifespan) and each worker (beside its shippers) runs `keep`, a
task that connects until PostgreSQL answers, and, when the schema is older than this
version's latest migration, applies the missing ones (`schema.upgrade`: under the
migrations' advisory lock, asked for again and again, never inside a statement, so any
number of processes may run it at once, each version applied once), then ends. It applies
this version's migrations only, never a newer schema's, and does nothing on a schema at
or past its own: what `dispatcher run` and the API pods' init container already did at
every start, while the older version's processes still ran (a migration stays readable and
writable by the version before: append-only, additive).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import structlog

from dispatcher.history import database, schema
from dispatcher.settings import EMBEDDED
from dispatcher.stopping import cancel_all

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["keep", "keeping"]

log = structlog.get_logger("dispatcher.history")

OUTAGE_CAP_S = 5.0  # PostgreSQL away: asked again at least this often (one connection)
FAILED_CAP_S = 60.0  # reachable, the upgrade failed: tried again at least this often


async def keep(settings: Settings) -> None:
    """Until the schema is at least this version's latest: connect, and apply the missing
    migrations (logged: `history.schema_upgraded`). An outage or a failed upgrade is
    logged and tried again (backing off up to `OUTAGE_CAP_S` / `FAILED_CAP_S`). Nothing to
    do without a PostgreSQL history, or with the embedded one (`dispatcher run` upgraded it
    before it started anything)."""
    if settings.history_url in (None, "", EMBEDDED):
        return
    backoff, away = 0.5, False
    while True:
        try:
            await _once(settings)
            return
        except database.OUTAGE as exc:
            if not away:  # once an outage: the shipper and the reads say it too
                log.warning("history.schema_unchecked", error=repr(exc), reason="unreachable")
            away, cap = True, OUTAGE_CAP_S
        except Exception as exc:  # reachable and failed: an operator may have to act
            log.error("history.schema_upgrade_failed", error=repr(exc), retry_in_s=backoff)
            cap = FAILED_CAP_S
        await asyncio.sleep(backoff)
        backoff = min(cap, backoff * 2)


async def _once(settings: Settings) -> None:
    conn = await database.connect(settings)
    try:
        found, latest = await schema.schema_version(conn), schema.MIGRATIONS[-1][0]
        if found < latest:
            log.warning("history.schema_upgrading", version=found, to=latest)
            applied = await schema.upgrade(conn)
            log.info("history.schema_upgraded", applied=applied, version=latest)
    except BaseException:
        conn.terminate()  # cancelled mid-migration too: its statement ends with the session
        raise
    with contextlib.suppress(Exception):
        await conn.close(timeout=settings.history_timeout)


@contextlib.asynccontextmanager
async def keeping(settings: Settings) -> AsyncIterator[None]:
    """`keep` in a task while the block runs, cancelled after."""
    task = asyncio.create_task(keep(settings))
    try:
        yield
    finally:
        await cancel_all([task])
