"""A minimal HTTP/1.1 keep-alive receiver, run in its own process (not project code).

Every request is answered `200 ok` at once (or, with `--delay-ms N`, N ms later: a slow
receiver, which also counts the requests it holds). It counts requests and notes the wall-clock
time (time.time()) of the first and last; in latency mode it also keeps, per request, the
emit time the bench put in the event data (`"emit_t": <epoch s>`) and the arrival time.

Control paths (used by the bench only, never counted):
    GET  /_stats          {"count", "first", "last", "latency_mode", "held"}
    GET  /_latency        {"pairs": [[emit_t, arrival_t], ...]}
    POST /_reset          clears counters; `?latency=1` switches latency mode on

Run: python -m bench.receiver [PORT] [--delay-ms N]  (prints `PORT <n>` on stdout once
listening on 127.0.0.1; stops on SIGTERM or when its stdin closes, so it never outlives the
bench).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import cast

import orjson

_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\n\r\nok"
)
_EMIT_T = re.compile(rb'"emit_t":\s*([0-9.eE+-]+)')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:\s*close", re.IGNORECASE)


@dataclass(slots=True)
class State:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    latency_mode: bool = False
    pairs: list[tuple[float, float]] = field(default_factory=list)
    delay_s: float = 0.0  # how long each answer is held back
    held: int = 0  # answers held back now

    def reset(self, latency: bool) -> None:
        self.count = 0
        self.first = self.last = 0.0
        self.latency_mode = latency
        self.pairs = []

    def hit(self, body: bytes) -> None:
        now = time.time()
        if self.count == 0:
            self.first = now
        self.count += 1
        self.last = now
        if self.latency_mode and (match := _EMIT_T.search(body)):
            self.pairs.append((float(match.group(1)), now))


def _json_response(value: object) -> bytes:
    body = orjson.dumps(value)
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class HttpProtocol(asyncio.Protocol):
    """Parses pipelined HTTP/1.1 requests with Content-Length bodies (no chunked)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            match = _CONTENT_LENGTH.search(head)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(buffer) < total:
                return
            body = bytes(buffer[end + 4 : total])
            del buffer[:total]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        line_end = head.find(b"\r\n")
        request_line = head[: line_end if line_end >= 0 else len(head)]
        path = request_line.split(b" ", 2)[1] if request_line.count(b" ") >= 1 else b"/"
        if not path.startswith(b"/_"):
            self.state.hit(body)
            close = _CLOSE.search(head) is not None
            if self.state.delay_s:
                self.state.held += 1
                loop = asyncio.get_running_loop()
                loop.call_later(self.state.delay_s, self._late_answer, close)
                return
            self.transport.write(_OK)
            if close:
                self.transport.close()
            return
        self.transport.write(self._control(path))
        self.transport.close()

    def _late_answer(self, close: bool) -> None:
        self.state.held -= 1
        if self.transport is not None:
            self.transport.write(_OK)
            if close:
                self.transport.close()

    def _control(self, path: bytes) -> bytes:
        state = self.state
        if path.startswith(b"/_stats"):
            return _json_response(
                {
                    "count": state.count,
                    "first": state.first,
                    "last": state.last,
                    "latency_mode": state.latency_mode,
                    "held": state.held,
                }
            )
        if path.startswith(b"/_latency"):
            return _json_response({"pairs": state.pairs})
        if path.startswith(b"/_reset"):
            state.reset(latency=b"latency=1" in path)
            return _json_response({"reset": True})
        return _json_response({"error": "unknown control path"})

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int = 0, delay_s: float = 0.0) -> None:
    state = State(delay_s=delay_s)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpProtocol(state), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_stdin() -> None:  # the bench closed our stdin, or died: stop with it
        if not os.read(sys.stdin.fileno(), 4096):
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    async with server:
        await stop.wait()


def main() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    parser = argparse.ArgumentParser(description="the bench's HTTP receiver")
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--delay-ms", type=int, default=0, help="hold each answer this long")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
