"""The ship lock's session: closed by the server once idle, kept busy while its shipper lives.

A shipper holds the ship lock (a PostgreSQL advisory lock) as long as its session lives. A
process that dies frees it with its connection; one that stops without dying (SIGSTOP, a
hung event loop, a paused VM) kept it for ever: its kernel answers TCP keepalives, so its
session stayed 'idle', no standby took over, the backlog grew to
`DISPATCHER_HISTORY_BACKLOG_LIMIT` and every worker stopped claiming.

Now the server closes a shipper's session idle for `IDLE_S`, which frees the lock:
`idle_session_timeout` (PostgreSQL 14 and later; an older server logs
`history.ship_lock_unguarded` once a connection, and a frozen leader keeps its lock there)
and `idle_in_transaction_session_timeout` (frozen inside a transaction). A live shipper
runs a statement at least every third of `IDLE_S`, its stream empty or not, and a standby
asks for the lock as often. A shipper that wakes after its session was closed finds its
connection gone at its next statement, before anything of its batch commits, and takes the
lock again (or stands by) before it ships again. Were two to ship at once all the same,
nothing would be stored twice: each batch locks the watermark's row and drops what is at
or below it, and records are stored by their primary key.

Not covered: a shipper frozen while PostgreSQL waits on it inside a statement (in the
middle of sending a COPY's rows, tens of ms of each batch) is 'active', not idle; its
session lasts until the TCP connection fails.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    import asyncpg

__all__ = ["IDLE_S", "Session"]

log = structlog.get_logger("dispatcher.history")

IDLE_S = 20.0  # a ship lock's session idle this long is closed by the server
_IDLE_SETTINGS = (
    "SELECT set_config('idle_in_transaction_session_timeout', $1, false),"
    " set_config('idle_session_timeout', $1, false)"
)


class Session:
    """The idle bound of one shipper's sessions, and when it last used the current one."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self.used = 0.0  # time.monotonic() of its last bound() or keep()

    @property
    def every(self) -> float:
        """How often a shipper runs a statement at least (and a standby asks for the lock)."""
        return self.idle_s / 3

    async def bound(self, conn: asyncpg.Connection) -> None:
        """Have the server close `conn` once it is idle for `idle_s`."""
        ms = str(max(1, int(self.idle_s * 1000)))
        if conn.get_server_version() >= (14, 0):
            await conn.execute(_IDLE_SETTINGS, ms)
        else:
            await conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', $1, false)", ms
            )
            log.warning(
                "history.ship_lock_unguarded",
                reason="PostgreSQL before 14 has no idle_session_timeout: a frozen shipper"
                " keeps the ship lock until its connection fails",
            )
        self.used = time.monotonic()

    async def keep(self, conn: asyncpg.Connection) -> None:
        """A statement on `conn` when `keep` ran none for a third of `idle_s` (a session
        the server closed raises here, before the shipper reads its next batch)."""
        if time.monotonic() - self.used >= self.every:
            await conn.execute("SELECT 1")
            self.used = time.monotonic()
