"""Jobs whose runs never end: their deliveries end as final FAILED records, unsent.

Each claim of a job that does not end it counts (a run that timed out, failed or was
cut short by its worker's death; a lapsed lease); a claim that ends it, or moves a
fan-out on to its next chunk, or a retry coming due on its schedule, counts from 1
again. A job claimed more than `MAX_CLAIMS` times is not run as before: its run makes no
request and ends each delivery it holds with a final FAILED record saying why (`reason`;
listed by the dead-letter view, redelivered by its owner once the cause is found), not
counted against the callback's health. Nothing in it is lost: a fan-out's deliveries
already attempted are left to their own jobs, as on any re-run, and its later chunks run
as usual. Only a job whose runs giving up fail too, `GIVE_UP_RUNS` claims in a row,
is dropped on its next claim, on record (`dispatcher:deliveries:dropped`).

The job a task runs gives up when `giving_up` holds a reason in its context (set where
the worker starts the run): every attempt the run reaches reads it.
"""

from __future__ import annotations

import contextvars

__all__ = ["GIVE_UP_RUNS", "MAX_CLAIMS", "dropped", "giving_up", "reason"]

MAX_CLAIMS = 25  # a job claimed more often than this without ending gives up
GIVE_UP_RUNS = 3  # claims that give up; past them, the job is dropped on record
# the current run's reason to end its deliveries unsent (None: a run as any other)
giving_up: contextvars.ContextVar[str | None] = contextvars.ContextVar("giving_up", default=None)


def reason(claims: int) -> str | None:
    """Why a run at its `claims`-th claim gives up, or None when it runs as usual."""
    if claims <= MAX_CLAIMS:
        return None
    return (
        f"not sent: its job was claimed {claims} times without ending (its runs timed out, "
        "failed, or their worker died); redeliver it once the cause is fixed"
    )


def dropped(claims: int) -> bool:
    """Whether a job at its `claims`-th claim is dropped unrun: its giving up failed too."""
    return claims > MAX_CLAIMS + GIVE_UP_RUNS
