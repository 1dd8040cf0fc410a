"""The console in a real Chromium (the system's, driven by Playwright) against the real app
under uvicorn, a real worker process, Redis and a receiver: a person finds a failed
delivery, reads it, redelivers it and sees the second attempt; a member cannot redeliver.

Without Chromium these tests skip and say how to install it. With
`DISPATCHER_SCREENSHOTS=1` (`make screenshots`) they write the README's screenshots to
docs/console/; otherwise the screenshots go to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, Locator, Page, ViewportSize, async_playwright, expect
from redis.asyncio import Redis

from dispatcher.api import create_app
from dispatcher.auth import Role, Roles
from dispatcher.embedded import EmbeddedRedis
from dispatcher.keys import Keys
from dispatcher.models import Event, Region
from dispatcher.producer import Producer
from dispatcher.registry import Registry
from dispatcher.settings import Settings
from tests.helpers import UID, Receiver, RunWorker, answer, free_port, make_settings, start_worker

# DISPATCHER_TEST_CHROMIUM names another Chromium (or, set to a missing path, skips these)
CHROMIUM = (
    os.environ.get("DISPATCHER_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
XSS = "<script>alert(1)</script>"
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
Serve = Callable[[Settings], AbstractAsyncContextManager[str]]

keys = Keys()  # today's key names (one shard)

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"no Chromium at {CHROMIUM}: the console's browser tests drive the system's "
    "Chromium; install it with `apt-get install -y chromium` (.ci/run does)",
)


@pytest.fixture
def shots(repo_root: Path, tmp_path: Path) -> Path:
    """Where screenshots go: the README's folder only when asked to refresh them."""
    if os.environ.get("DISPATCHER_SCREENSHOTS") == "1":
        folder = repo_root / "docs" / "console"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
def serve(redis: Redis) -> Serve:
    """The app under uvicorn in a thread on 127.0.0.1 (its own Redis pool, on the test's
    Redis, flushed by the `redis` fixture); yields its base URL."""

    @asynccontextmanager
    async def run(settings: Settings) -> AsyncIterator[str]:
        port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                log_config=None, lifespan="on")  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            await asyncio.sleep(0.02)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await asyncio.to_thread(thread.join, 10)

    return run


async def reload_until(page: Page, rows: Locator, count: int, within: float = 10.0) -> None:
    """Reload until `rows` has `count` elements: the worker records attempts on its own time."""
    deadline = time.monotonic() + within
    while await rows.count() < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{await rows.count()} of {count} rows within {within} s")
        await asyncio.sleep(0.1)
        await page.reload()


async def test_a_person_finds_a_failed_delivery_and_redelivers_it(
    browser: Browser, serve: Serve, redis_server: EmbeddedRedis, receiver: Receiver,
    workers: list[Any], tmp_path: Path, shots: Path,
) -> None:  # fmt: skip
    settings = make_settings(redis_server.url)  # open access, as `dispatcher run`
    workers.append(start_worker(redis_server.url, tmp_path / "worker.log"))
    url = receiver.script("/hook", answer(404, "no such build"), answer(200, "thanks"))
    async with serve(settings) as base, httpx.AsyncClient(base_url=base, headers=UID) as http:
        # a project admin registers; the build system emits
        register = {"event": "BUILD_END", "region": "DEVNET", "url": url, "secretToken": "s3cret"}
        created = await http.post("/apigw-user/v4/projects/demo/callbacks", params=register)
        assert created.json()["data"] is True
        event = {"event": "BUILD_END", "data": {"buildId": "b-42", "note": XSS}}
        emitted = await http.post("/apigw/v4/projects/demo/events", json=event)
        assert emitted.json()["data"]["queued"]

        page = await (await browser.new_context(viewport=LAPTOP)).new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        await page.goto(f"{base}/console")
        await expect(page).to_have_title("Console · callback-dispatcher console")
        await page.get_by_label("Project id").focus()  # the keyboard is enough
        await page.keyboard.type("demo")
        await page.keyboard.press("Enter")
        await expect(page).to_have_title("Callbacks · demo · callback-dispatcher console")
        await expect(page.get_by_role("cell", name="project", exact=True)).to_be_visible()
        await page.screenshot(path=shots / "callbacks.png", full_page=True)

        await page.get_by_role("link", name=url, exact=True).click()
        await expect(page).to_have_title("History · demo · callback-dispatcher console")
        rows = page.locator("tbody tr:has(a[href*='/history/'])")
        await reload_until(page, rows, 1)  # the attempt appears
        await expect(rows.first).to_contain_text("FAILED")
        await expect(rows.first).to_contain_text("404")
        await page.screenshot(path=shots / "history.png", full_page=True)

        await rows.first.get_by_role("link").click()
        await expect(page).to_have_title("Attempt #1 · demo · callback-dispatcher console")
        request_body = page.get_by_label("Request body")
        await expect(request_body).to_contain_text(XSS)  # shown as text ...
        assert await page.locator("script").count() == 0  # ... never as an element
        await expect(page.get_by_label("Response body")).to_have_text("no such build")
        masked = page.get_by_role("cell", name="******")
        await expect(masked).to_have_count(2)  # the token and the signature

        await page.get_by_role("button", name="Redeliver").focus()
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("status")).to_contain_text("Redelivery queued")
        attempts = page.get_by_role("region", name="All attempts of delivery").locator("tbody tr")
        await reload_until(page, attempts, 2)  # the second attempt
        await expect(attempts.first).to_contain_text("SUCCESS")
        await expect(attempts.first).to_contain_text("redelivery")
        await expect(attempts.nth(1)).to_have_attribute("aria-current", "true")
        await page.screenshot(path=shots / "attempt.png", full_page=True)
        first, second = receiver.requests()
        assert (
            second.body == first.body
            and second.headers["webhook-id"] == first.headers["webhook-id"]
        )
        # the same URL takes another event too
        register["event"] = "BUILD_STAGE_END"
        await http.post("/apigw-user/v4/projects/demo/callbacks", params=register)
        stage = {"event": "BUILD_STAGE_END", "data": {"buildId": "b-42", "stage": 1}}
        await http.post("/apigw/v4/projects/demo/events", json=stage)
        await receiver.wait_for(3, within=10)

        await page.get_by_role("link", name="Dead letters").click()
        await expect(page).to_have_title("Dead letters · demo · callback-dispatcher console")
        await page.screenshot(path=shots / "dead-letters.png", full_page=True)

        # the failures of the last hour, one click from the top of any project page
        await page.get_by_role("link", name="Failures, last hour").click()
        await expect(page).to_have_title(
            "Failures of the last hour · demo · callback-dispatcher console"
        )
        failures = page.get_by_role("region", name="Attempts, newest first").locator("tbody tr")
        await expect(failures).to_have_count(1)
        await expect(failures.first).to_contain_text("404")
        await page.screenshot(path=shots / "failures.png", full_page=True)
        # a callback's recent deliveries, every event, from the callbacks page
        await page.get_by_role("link", name="Callbacks", exact=True).click()
        await page.get_by_role("link", name="Recent deliveries to").first.click()
        await expect(page).to_have_title("Recent deliveries · demo · callback-dispatcher console")
        rows = page.get_by_role("region", name="Attempts, newest first").locator("tbody tr")
        await expect(rows).to_have_count(3)  # the 404, its redelivery, the stage event's
        await expect(rows.filter(has_text="BUILD_STAGE_END")).to_have_count(1)
        await page.get_by_label("Status").select_option("FAILED")
        await page.get_by_role("button", name="Show").click()
        await expect(rows).to_have_count(1)
        await page.get_by_label("Status").select_option("")
        await page.get_by_role("button", name="Show").click()
        await expect(rows).to_have_count(3)
        await page.screenshot(path=shots / "deliveries.png", full_page=True)
        await rows.first.get_by_role("link").click()
        await expect(page).to_have_title(re.compile(r"^Attempt #\d+ · demo"))

        await page.get_by_role("link", name="Status").click()
        await expect(page).to_have_title("Status · callback-dispatcher console")
        live = page.get_by_role("region", name="Live workers")
        await expect(live.get_by_role("cell", name=str(workers[0].pid))).to_be_visible()
        # the worker's attempt counts reach the charts with its next heartbeat (every 5 s)
        await reload_until(page, page.locator("svg .bar.success"), 2)
        charts = ["Attempts per minute in the last hour", "Attempts per 10 minutes in the last day"]
        charts += [f"Attempt duration p50 and p99 per {per}" for per in ("minute", "10 minutes")]
        for name in charts:
            await expect(page.get_by_role("img", name=name)).to_be_visible()
        assert await page.locator("script").count() == 0
        await page.screenshot(path=shots / "status.png", full_page=True)

        phone = await (await browser.new_context(viewport=PHONE)).new_page()
        await phone.goto(f"{base}/console/projects/demo/history/1")
        width = await phone.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"]  # wide tables scroll inside their region, not the page
        await phone.screenshot(path=shots / "attempt-phone.png", full_page=True)
        assert dialogs == []


async def test_a_member_sees_the_attempt_but_cannot_redeliver(
    browser: Browser, serve: Serve, redis_server: EmbeddedRedis, redis: Redis,
    receiver: Receiver, run_worker: RunWorker, settings: Settings,
) -> None:  # fmt: skip
    strict = make_settings(redis_server.url, open_access=False)
    roles = Roles(redis, strict, keys)
    await roles.grant("demo", "mia", Role.MEMBER)
    await roles.grant("demo", "ada", Role.ADMIN)
    url = receiver.script("/hook", answer(500))
    await Registry(redis).create("demo", url, Event.BUILD_END, Region.DEVNET)
    await Producer(settings, redis).emit("demo", "BUILD_END", {"buildId": "b-7"})
    await run_worker()
    async with serve(strict) as base:
        # the gateway names the user; here the browser plays the gateway
        page = await browser.new_page()
        for uid, buttons in (("mia", 0), ("ada", 1)):
            await page.set_extra_http_headers({"X-DEVOPS-UID": uid})
            await page.goto(f"{base}/console/projects/demo/history/1")
            await expect(page.get_by_role("heading", name="Attempt #1")).to_be_visible()
            await expect(page.get_by_role("button", name="Redeliver")).to_have_count(buttons)
        await page.set_extra_http_headers({})
        answer_without_uid = await page.goto(f"{base}/console/projects/demo")
        assert answer_without_uid is not None and answer_without_uid.status == 401
        await expect(page.get_by_role("alert")).to_contain_text("through the gateway")


async def test_the_docs_render_and_no_other_site_may_frame_them(
    browser: Browser, serve: Serve, settings: Settings, receiver: Receiver
) -> None:
    """Swagger UI and ReDoc run their own scripts under the API's headers (the policy only
    forbids frames), and a page of another origin (the receiver's port) that frames them
    gets nothing: both could be framed under another site's page (review)."""
    async with serve(settings) as base:
        page = await browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        await page.goto(f"{base}/docs")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text(
            "callback-dispatcher"
        )
        await expect(page.locator(".opblock").first).to_be_visible()
        await page.goto(f"{base}/redoc")
        await expect(
            page.get_by_role("heading", name=re.compile("callback-dispatcher"))
        ).to_be_visible()
        # nothing refused (ReDoc's bundle asks cdn.redoc.ly for its logo: not resolved here)
        assert not [error for error in errors if "Refused" in error], errors

        frames = "".join(f'<iframe src="{base}{path}"></iframe>' for path in ("/docs", "/redoc"))
        html = {"Content-Type": "text/html"}
        elsewhere = receiver.script("/framing", answer(200, frames, html))
        await page.goto(elsewhere)
        await asyncio.sleep(1)  # what a frame shows, it shows by now (the docs, above: ~0.3 s)
        inner = [frame for frame in page.frames if frame != page.main_frame]
        assert len(inner) == 2
        for frame in inner:
            assert await frame.locator(".swagger-ui, redoc, [role=heading]").count() == 0
        assert any("frame-ancestors" in error for error in errors), errors
