"""Load generators, each run in its own process: python -m bench.loadgen MODE [options].

emit      Producer.emit() of N events, `--inflight` at once          -> events/s
enqueue   bare arq `enqueue_job` of the same payloads, same inflight  -> events/s
batch     emit_many() of `--n` events vs as many single emit() calls -> events/s, each repeat
emit-many emit_many() of `--n` events, `--repeats` times              -> events/s, each repeat
http-emit the HTTP emit route at `--url`, one event a request, `--inflight` at once -> events/s
http-batch the HTTP batch route at `--url`, `--n` events a request, `--repeats` requests
          one after the other                                        -> events/s, each request
latency   emit() at `--rate` events/s for `--duration` s, open loop   -> how many were sent
ceiling   raw aiohttp POST loop to `--url`, `--concurrency` at once   -> requests/s
http      the worker's HTTP path vs raw aiohttp to `--url`            -> CPU µs per request

Every mode prints one JSON line. Connections are opened before the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from arq.connections import create_pool

from bench.common import (
    EVENT,
    PROJECT,
    TOKEN,
    USER,
    bench_settings,
    event_data,
    install_uvloop,
)
from dispatcher.clock import now_ms
from dispatcher.connections import redis_settings
from dispatcher.jobs import FAN_OUT, job_deserializer, job_serializer
from dispatcher.producer import Producer


async def _drive(n: int, inflight: int, one: Callable[[int], Awaitable[Any]]) -> float:
    """Run one(i) for i in range(n), `inflight` at a time; returns the seconds taken."""
    next_i = 0

    async def lane() -> None:
        nonlocal next_i
        while next_i < n:
            i = next_i
            next_i += 1
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(inflight, n))))
    return time.perf_counter() - started


async def _warm(redis: Any, inflight: int) -> None:
    """Open `inflight` pooled connections before timing."""
    await asyncio.gather(*(redis.ping() for _ in range(inflight)))


async def mode_emit(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(args.redis_url)
    async with Producer(settings) as producer:
        await _warm(producer.queue.redis, args.inflight)
        seconds = await _drive(
            args.n, args.inflight, lambda i: producer.emit(PROJECT, EVENT, event_data(i))
        )
    return {"n": args.n, "seconds": seconds, "rate": args.n / seconds}


async def mode_enqueue(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(args.redis_url)
    redis = await create_pool(
        redis_settings(settings),
        job_serializer=job_serializer,
        job_deserializer=job_deserializer,
        default_queue_name=settings.queue_name,
    )
    try:
        await _warm(redis, args.inflight)

        async def one(i: int) -> None:
            # The payload Producer.emit builds (dispatcher/jobs.py EventJob.to_wire).
            payload: dict[str, Any] = {
                "id": "evt_" + uuid.uuid4().hex,
                "projectId": PROJECT,
                "event": EVENT,
                "data": event_data(i),
                "emittedAt": now_ms(),
            }
            job = await redis.enqueue_job(FAN_OUT, payload, _job_id=str(payload["id"]))
            assert job is not None

        seconds = await _drive(args.n, args.inflight, one)
    finally:
        await redis.aclose()
    return {"n": args.n, "seconds": seconds, "rate": args.n / seconds}


async def _emit_many_rate(producer: Producer, n: int) -> float:
    """events/s of one `emit_many` of `n` events (the list is built before the clock)."""
    events = [(PROJECT, EVENT, event_data(i)) for i in range(n)]
    started = time.perf_counter()
    await producer.emit_many(events)
    return n / (time.perf_counter() - started)


async def mode_batch(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(args.redis_url)
    batch_rates: list[float] = []
    single_rates: list[float] = []
    async with Producer(settings) as producer:
        await producer.queue.redis.ping()
        for _ in range(args.repeats):
            batch_rates.append(await _emit_many_rate(producer, args.n))
            events = [(PROJECT, EVENT, event_data(i)) for i in range(args.n)]
            started = time.perf_counter()
            for project, event, data in events:
                await producer.emit(project, event, data)
            single_rates.append(args.n / (time.perf_counter() - started))
    return {
        "n": args.n,
        "batch_rates": batch_rates,
        "single_rates": single_rates,
        "batch_rate": statistics.median(batch_rates),
        "single_rate": statistics.median(single_rates),
    }


async def mode_emit_many(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(args.redis_url)
    async with Producer(settings) as producer:
        await producer.queue.redis.ping()
        rates = [await _emit_many_rate(producer, args.n) for _ in range(args.repeats)]
    return {"n": args.n, "rates": rates, "rate": statistics.median(rates)}


EVENTS_ROUTE = f"/apigw/v4/projects/{PROJECT}/events"
JSON = {"X-DEVOPS-UID": USER, "Content-Type": "application/json"}


async def mode_http_emit(args: argparse.Namespace) -> dict[str, Any]:
    """What a JVM producer does: POST each event, `--inflight` keep-alive connections."""
    import aiohttp

    url = args.url + EVENTS_ROUTE
    connector = aiohttp.TCPConnector(limit=args.inflight, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            body = orjson.dumps({"event": EVENT, "data": event_data(i)})
            async with session.post(url, data=body, headers=JSON) as response:
                await response.read()
                assert response.status == 200, response.status

        async def warm(i: int) -> None:
            async with session.get(args.url + "/healthz") as response:
                await response.read()

        await asyncio.gather(*(warm(i) for i in range(args.inflight)))
        seconds = await _drive(args.n, args.inflight, one)
    return {"n": args.n, "seconds": seconds, "rate": args.n / seconds}


async def mode_http_batch(args: argparse.Namespace) -> dict[str, Any]:
    """One client POSTs `--repeats` JSON arrays of `--n` events, one after the other; the
    body is encoded inside the clock (a producer has to)."""
    import aiohttp

    url = args.url + EVENTS_ROUTE + "/batch"
    rates: list[float] = []
    async with aiohttp.ClientSession() as session:
        async with session.get(args.url + "/healthz") as response:
            await response.read()
        for _ in range(args.repeats):
            events = [{"event": EVENT, "data": event_data(i)} for i in range(args.n)]
            started = time.perf_counter()
            async with session.post(url, data=orjson.dumps(events), headers=JSON) as response:
                answer = orjson.loads(await response.read())
            rates.append(args.n / (time.perf_counter() - started))
            assert response.status == 200 and answer["data"]["failed"] == 0, answer["message"]
    return {"n": args.n, "rates": rates, "rate": statistics.median(rates)}


async def mode_latency(args: argparse.Namespace) -> dict[str, Any]:
    settings = bench_settings(args.redis_url)
    n = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    lag_max = 0.0
    pending: set[asyncio.Task[str]] = set()
    async with Producer(settings) as producer:
        await _warm(producer.queue.redis, 20)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        for i in range(n):
            due = start + i * interval
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            lag_max = max(lag_max, loop.time() - due)
            task = asyncio.create_task(
                producer.emit(PROJECT, EVENT, event_data(i, emit_t=time.time()))
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        elapsed = loop.time() - start
    return {"sent": n, "seconds": elapsed, "rate": n / elapsed, "schedule_lag_max_s": lag_max}


async def mode_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from dispatcher.delivery import encode_body
    from dispatcher.headers import request_headers

    body = encode_body(EVENT, PROJECT, event_data(0))
    headers = request_headers(
        event=EVENT, delivery_id="evt_x.1", body=body, token=TOKEN, user_agent="bench"
    )
    connector = aiohttp.TCPConnector(limit=args.concurrency, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def one(i: int) -> None:
            async with session.post(args.url, data=body, headers=headers) as response:
                await response.read()
                assert response.status == 200

        seconds = await _drive(args.n, args.concurrency, one)
    return {"n": args.n, "seconds": seconds, "rate": args.n / seconds}


async def mode_http(args: argparse.Namespace) -> dict[str, Any]:
    """CPU per request of the worker's HTTP path (`dispatcher.delivery.send` through the
    region's `dispatcher.egress.Client`) against a raw aiohttp
    session, both `--concurrency` at once against the same receiver, interleaved."""
    import aiohttp

    from dispatcher.delivery import encode_body, send
    from dispatcher.egress import Client
    from dispatcher.headers import request_headers
    from dispatcher.models import Region

    settings = bench_settings("redis://127.0.0.1:1/0")  # never connected
    body = encode_body(EVENT, PROJECT, event_data(0))
    headers = request_headers(
        event=EVENT, delivery_id="evt_x.1", body=body, token=TOKEN, user_agent="bench"
    )
    client = Client(settings, Region.DEVNET)
    connector = aiohttp.TCPConnector(limit=args.concurrency, keepalive_timeout=30)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def dispatcher_send(i: int) -> None:
        result = await send(
            client, args.url, body, headers, connect_timeout=settings.connect_timeout,
            total_timeout=settings.total_timeout, max_response_body=settings.max_response_body,
        )  # fmt: skip
        assert result.status_code == 200, result

    async def raw(i: int) -> None:
        async with session.post(args.url, data=body, headers=headers) as response:
            await response.read()
            assert response.status == 200

    paths = {"dispatcher.delivery.send": dispatcher_send, "raw aiohttp": raw}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(args.repeats):
            for name, one in paths.items():
                started = time.process_time()
                await _drive(args.n, args.concurrency, one)
                cpu[name].append(1e6 * (time.process_time() - started) / args.n)
    finally:
        await client.aclose()
        await session.close()
    return {
        "n": args.n,
        "cpu_us_per_request": {name: statistics.median(v) for name, v in cpu.items()},
        "runs": cpu,
    }


MODES: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]] = {
    "emit": mode_emit,
    "enqueue": mode_enqueue,
    "batch": mode_batch,
    "emit-many": mode_emit_many,
    "http-emit": mode_http_emit,
    "http-batch": mode_http_batch,
    "latency": mode_latency,
    "ceiling": mode_ceiling,
    "http": mode_http,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--url", default="")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    install_uvloop()
    result = asyncio.run(MODES[args.mode](args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
