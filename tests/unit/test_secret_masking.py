"""What `mask_secrets` does to a receiver's answer: each secret the attempt sent masked, as
sent and as JSON escapes it; a short one only where it stands alone; in an error text too."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from dispatcher.delivery import send
from dispatcher.headers import mask_secrets, request_headers, sent_secrets


def test_every_secret_sent_is_masked_as_sent_and_json_escaped() -> None:
    token, previous = 'tok"en\\-0123456789', "previous-0123456789"
    auth = ("X-Api-Key", "Key credential-0123456789")
    headers = request_headers(
        event="BUILD_END", delivery_id="p:e.1", body=b"{}", token=token, user_agent="t",
        auth_header=auth, previous_token=previous,
    )  # fmt: skip
    secrets = sent_secrets(headers, previous, auth)
    signatures = headers["webhook-signature"].split()
    echoed = json.dumps({"headers": headers, "sigs": signatures, "cred": "credential-0123456789"})
    masked = mask_secrets(echoed, secrets)
    for secret in (token, previous, auth[1], "credential-0123456789", *signatures):
        assert secret not in masked and json.dumps(secret)[1:-1] not in masked
    assert json.loads(masked)["headers"]["X-DEVOPS-EVENT"] == "BUILD_END"  # the rest as it was
    assert mask_secrets("nothing to hide", secrets) == "nothing to hide"


def test_a_short_secret_is_masked_only_where_it_stands_alone() -> None:
    """A 4-character token masked inside words garbles the text and gives itself away by
    the gaps: `pytest` with `test` masked reads `py******`."""
    secrets = sent_secrets({"X-DEVOPS-WEBHOOK-TOKEN": "test"})
    text = '{"token": "test", "runner": "pytest", "auth": "Bearer test", "tests": 3}'
    assert mask_secrets(text, secrets) == (
        '{"token": "******", "runner": "pytest", "auth": "Bearer ******", "tests": 3}'
    )


async def test_a_secret_in_a_client_errors_message_is_masked() -> None:
    """No client error met today quotes an answer (`tests/service/test_hostile_receivers.py`),
    but one whose message did would not reach the record with a secret in it."""
    token = "token-0123456789"

    class Raising:
        def post(self, *args: Any) -> Any:
            @contextlib.asynccontextmanager
            async def response() -> AsyncIterator[Any]:
                raise aiohttp.ClientOSError(f"the peer said: bad token {token}")
                yield

            return response()

    result = await send(
        Raising(), "http://receiver.example/hook", b"{}", {"X-DEVOPS-WEBHOOK-TOKEN": token},
        connect_timeout=1, total_timeout=2, max_response_body=100,
        secrets=sent_secrets({"X-DEVOPS-WEBHOOK-TOKEN": token}),
    )  # fmt: skip
    assert result.error == "ClientOSError: the peer said: bad token ******"
