"""What `mask_secrets` does to a receiver's answer: each secret the attempt sent masked, as
sent and as JSON escapes it; a short one only where it stands alone."""

from __future__ import annotations

import json

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
