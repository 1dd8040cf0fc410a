"""Long-running processes: the API and a worker in one event loop (`dispatcher run`,
`dispatcher api`), a worker alone (`dispatcher worker`), with their signal handling."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from dispatcher.api import create_app
from dispatcher.lookups import LOOKUP_THREADS
from dispatcher.worker import create_worker

if TYPE_CHECKING:
    from dispatcher.settings import Settings

__all__ = ["api_config", "install_uvloop", "lookup_pool", "serve", "work"]

log = structlog.get_logger("dispatcher.api")


def tune_gc() -> None:
    """Once the process is built: what it imported and made so far stays out of every
    garbage collection (it lives as long as the process), and collections come less often.
    A delivery makes many small short-lived objects; with the defaults, collecting cost a
    worker 10-18 % of its CPU (make bench, worker CPU per delivery: 474-497 µs, 392-397 µs
    with this)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def install_uvloop() -> None:
    """uvloop, its lookup pool as big as `lookup_pool` makes asyncio's (libuv reads
    `UV_THREADPOOL_SIZE` once, when it first needs the pool)."""
    os.environ.setdefault("UV_THREADPOOL_SIZE", str(LOOKUP_THREADS))
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # we own the signals: uvicorn would re-raise them and skip our clean-up


def lookup_pool() -> None:
    """The running loop's default thread pool, where asyncio's name lookups run: room for
    `dispatcher.lookups.PER_OWNER` hung lookups of many owners (asyncio's default is
    min(32, CPUs + 4) threads, 6 on two cores: two owners' worth)."""
    pool = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="lookup")
    asyncio.get_running_loop().set_default_executor(pool)


def api_config(settings: Settings) -> uvicorn.Config:
    """uvicorn for the API. HTTP/1.1 through h11, even where httptools is installed: with
    httptools uvicorn drops the body of a request that offers an upgrade it does not take
    (Kludex/uvicorn#2722), and every stock JDK HttpClient offers `h2c` on each request.
    (httptools measured -17% of the API's CPU per emit request.)"""
    return uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        lifespan="on",
        http="h11",
    )


async def serve(settings: Settings, *, with_worker: bool) -> None:
    """The API (and a worker) until SIGINT/SIGTERM; then the API stops taking requests and
    the worker finishes its jobs (up to DISPATCHER_SHUTDOWN_GRACE) before we return."""
    server = _Server(api_config(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = create_worker(settings, handle_signals=False) if with_worker else None
    lookup_pool()
    tune_gc()
    api = asyncio.create_task(_serving(server))
    tasks: list[asyncio.Task[Any]] = [api]
    if worker is not None:
        tasks.append(asyncio.create_task(worker.main()))
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        server.should_exit = True
        if not server.started and not api.done():
            _stop_starting(api)
        if worker is not None:
            worker.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        if worker is not None:
            await worker.close()
    if not api.cancelled() and (status := api.result()):
        raise SystemExit(status)


async def _serving(server: uvicorn.Server) -> int:
    """`server.serve()`; the status uvicorn exits the process with when it cannot start
    (its port taken: it calls `sys.exit`), else 0. Raised in a task, `SystemExit` left the
    event loop at once, the worker was cancelled in the middle of its stop, and with the
    PostgreSQL history the process hung for good (review)."""
    try:
        await server.serve()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _stop_starting(server: asyncio.Task[int]) -> None:
    """Stop an API still starting: its start waits for the home shard's placement as long
    as it takes, and heeds no `should_exit` (a SIGTERM then waited for Redis; review). Its
    start is cancelled when the process ends, which uvicorn would log as a failed start,
    with a traceback: it is not one."""
    log.info("api.stopped_while_starting")
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: "CancelledError" not in record.getMessage()
    )
    server.cancel()


def work(settings: Settings) -> None:
    """A worker process until SIGINT/SIGTERM. A Redis outage of any length is waited out
    inside the loop; the process never restarts it."""

    async def main() -> None:
        worker = create_worker(settings)
        lookup_pool()
        tune_gc()
        try:
            await worker.main()
        finally:
            await worker.close()

    asyncio.run(main())
