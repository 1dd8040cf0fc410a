"""Bits every bench process shares: settings, the event payload and a history record,
uvloop, /proc readings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import orjson

from dispatcher.delivery import Attempted, AttemptResult, Outcome, encode_body
from dispatcher.headers import mask_headers, request_headers
from dispatcher.history.record import AttemptRecord
from dispatcher.jobs import DeliveryJob
from dispatcher.models import Region
from dispatcher.registry import CallbackTarget
from dispatcher.settings import Settings
from dispatcher.worker.record import attempt_record

PROJECT = "bench"
EVENT = "BUILD_END"
TOKEN = "bench-secret-token"
USER = "bench-producer"  # X-DEVOPS-UID of the HTTP producers, an admin of PROJECT
INTERNAL_REGIONS = ["DEVNET", "OSS", "IDC"]
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MAX_JOBS: int = Settings.model_fields["worker_max_jobs"].default
POLL_DELAY: float = Settings.model_fields["poll_delay"].default


def install_uvloop() -> None:
    """What `dispatcher worker` does (dispatcher/cli.py `_install_uvloop`)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def bench_settings(redis_url: str, **overrides: Any) -> Settings:
    """Default settings, except that receivers on 127.0.0.1 are allowed; `overrides` win."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "allow_internal_regions": INTERNAL_REGIONS,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


def event_data(n: int, emit_t: float | None = None) -> dict[str, Any]:
    """A CI event's data, about 400 bytes of JSON, like a real BUILD_END."""
    data: dict[str, Any] = {
        "projectId": PROJECT,
        "pipelineId": f"p-{n % 97:05d}",
        "pipelineName": "bench-pipeline",
        "buildId": f"b-{n:09d}",
        "buildNum": n,
        "status": "SUCCEED",
        "trigger": "MANUAL",
        "userId": "bench-user",
        "startTime": 1_700_000_000_000 + n,
        "endTime": 1_700_000_060_000 + n,
        "stages": [
            {"stageId": f"s-{i}", "name": f"stage {i}", "status": "SUCCEED"} for i in range(3)
        ],
        "variables": {"BK_CI_GIT_REPO_BRANCH": "main", "BK_CI_START_TYPE": "MANUAL"},
    }
    if emit_t is not None:
        data["emit_t"] = emit_t
    return data


def padded(data: dict[str, Any], size: int) -> dict[str, Any]:
    """`data` with a `log` string that brings its JSON to about `size` bytes (as it is when
    it is as big already)."""
    room = size - len(orjson.dumps(data)) - len(',"log":""')
    return data | {"log": "x" * room} if room > 0 else data


def record_template() -> AttemptRecord:
    """A history record as the worker writes it (`dispatcher.worker.record.attempt_record`
    of a signed 200 attempt), for the history scenarios to fill stores with; its
    per-record fields are left blank."""
    body = encode_body(EVENT, PROJECT, event_data(1))
    job = DeliveryJob("evt_0.1", "evt_0.1", "evt_0", PROJECT, EVENT, body, 1, emitter=PROJECT)
    target = CallbackTarget(1, "", Region.DEVNET, TOKEN, project_id=PROJECT)
    headers = request_headers(
        event=EVENT, delivery_id="evt_0.1", body=body, token=TOKEN, user_agent="bench"
    )
    answered = AttemptResult(Outcome.SUCCESS, 200, "ok", None, None, 0, 2)
    record = attempt_record(job, target, 1, Attempted(answered, mask_headers(headers)), True,
                            bench_settings("redis://127.0.0.1:1"))  # fmt: skip
    blank: AttemptRecord = {"projectId": PROJECT, "callBackUrl": "", "events": "",
                            "status": record["status"], "createdTime": 0, "startTime": 0,
                            "endTime": 0, "deliveryId": "", "eventId": ""}  # fmt: skip
    return record | blank


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (free now; bind it soon)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or another field, e.g. VmHWM, the peak) of a process, from /proc/<pid>/status
    (kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine_busy_seconds() -> float:
    """CPU time all processes on this machine have used so far (all cores), /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
