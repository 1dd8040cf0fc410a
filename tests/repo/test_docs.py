"""/docs and /redoc work on an intranet: every file they load is served by the app."""

from __future__ import annotations

import re

import httpx
import pytest


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_docs_load_nothing_from_outside(api: httpx.AsyncClient, path: str) -> None:
    page = await api.get(path)
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and "fonts.googleapis" not in page.text
    for asset in assets:
        assert asset.startswith("/"), asset
        fetched = await api.get(asset)
        assert fetched.status_code == 200 and len(fetched.content) > 1000, asset
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
