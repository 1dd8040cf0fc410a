"""The delivery console: server-rendered pages at `/console` for people (callbacks,
history with request and response detail, redelivery, dead letters, status), served by
the API process itself. Templates and styles ship in this package; no script, no CDN.

An app serves its `ROUTERS` and `install`s the rest; the pages (`pages`) and forms
(`actions`) call `Services` only, through the plumbing of `page` (caller, role, CSRF token
from `csrf`, errors)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.staticfiles import StaticFiles

from dispatcher.console import actions, pages
from dispatcher.console.page import PREFIX, Templates

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dispatcher.settings import Settings

__all__ = ["ROUTERS", "install"]

ROUTERS = (pages.router, actions.router)  # the console's pages and forms


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the console's static files from `app`, with what its pages need (its
    `ROUTERS` come before)."""
    app.state.console_templates = Templates(settings.tz)
    app.mount(
        f"{PREFIX}/static",
        StaticFiles(packages=[("dispatcher.console", "static")]),
        name="console-static",
    )
