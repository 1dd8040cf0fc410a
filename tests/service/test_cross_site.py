"""Cross-site request forgery against the API (the gateway's cookie goes with a page's
requests): what another site's page may send without asking first is refused on every
route that changes something; clients, and the console's own forms, are not."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

from dispatcher.registry import Registry
from tests.helpers import UID

CALLBACKS = "/apigw/v4/projects/demo/callbacks"
PARAMS = {"event": "BUILD_END", "region": "DEVNET", "url": "https://hooks.example/h"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),  # a sibling host is another site's page too
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),  # a form's post
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({"Content-Type": "text/plain;charset=UTF-8"}, 415),  # a no-cors fetch's
    ],
)
async def test_a_change_another_sites_page_could_send_is_refused(
    api: httpx.AsyncClient, redis: Redis, headers: dict[str, str], status: int
) -> None:
    """A page elsewhere posting a form to register its own URL for the project's events
    (everything the route needs is in the query string) got it registered."""
    answer = await api.post(CALLBACKS, params=PARAMS, headers={**UID, **headers})
    body = answer.json()
    assert (answer.status_code, body["status"], body["data"]) == (status, status, None)
    assert (await Registry(redis).list("demo")).count == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, the CLI, any client: no body, no type
        {"Content-Type": "application/json"},  # the seeds' header
        {"Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar
    ],
)
async def test_a_clients_change_goes_through(
    api: httpx.AsyncClient, redis: Redis, headers: dict[str, str]
) -> None:
    answer = await api.post(CALLBACKS, params=PARAMS, headers={**UID, **headers})
    assert answer.json()["status"] == 0, answer.json()
    assert (await Registry(redis).list("demo")).count == 1


async def test_reads_from_another_site_are_left_to_the_browser(api: httpx.AsyncClient) -> None:
    """A read changes nothing, and the browser keeps its answer from the other site's
    page (no CORS header is sent): it is served."""
    answer = await api.get(CALLBACKS, headers={**UID, "Sec-Fetch-Site": "cross-site"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
