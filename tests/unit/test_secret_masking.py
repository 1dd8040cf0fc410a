"""What `mask_secrets` does to a receiver's answer: each secret the attempt sent masked, as
sent and as JSON, HTML and URLs escape it; a short one only where it stands alone; in an error
text too."""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, quote_plus

import aiohttp
import pytest

from dispatcher import masking
from dispatcher.delivery import send
from dispatcher.headers import request_headers, sent_secrets
from dispatcher.masking import mask_cut, mask_secrets
from dispatcher.models import MASK


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


TOKEN = "tok-0123456789abcdefXYZ/+&<>'\"=end"  # what encoders escape, one of each
CREDENTIAL = "/cred0123456789+abcdef=&"  # escaped at either end: `\\/`, `&amp;`


def php(text: str) -> str:  # json_encode: `/` as `\/`
    return json.dumps(text).replace("/", "\\/")


def go(text: str) -> str:  # encoding/json: `&<>` as `\u0026`, `\u003c`, `\u003e`
    return json.dumps(text).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def dotnet(text: str) -> str:  # System.Text.Json: `+`, `'`, `"`, `&<>` as `\u002B` ...
    escaped = json.dumps(text)[1:-1].replace('\\"', '"')
    for c in "+'\"&<>":
        escaped = escaped.replace(c, f"\\u{ord(c):04X}")
    return f'"{escaped}"'


def numeric(text: str) -> str:  # HTML with numeric references, as PHP and Go write some
    return html.escape(text).replace("&#x27;", "&#039;").replace("&quot;", "&#34;")


ENCODERS = [php, go, dotnet, html.escape, numeric]


@pytest.mark.parametrize("encode", ENCODERS)
def test_a_secret_is_masked_as_json_and_html_encoders_escape_it(encode: Any) -> None:
    """One escaped form was looked for (`\\"` and `\\\\`): PHP writes `/` as `\\/`, Go `&<>`
    as `\\u0026`..., .NET `+` and `'` too, an HTML page `"` as `&quot;`. The token and the
    signature's MAC (base64: `/` and `+` about half the time) went to the record in clear."""
    auth = ("Authorization", f"Bearer {CREDENTIAL}")
    headers = request_headers(
        event="BUILD_END", delivery_id="p:e.1", body=b"{}", token=TOKEN, user_agent="t",
        auth_header=auth,
    )  # fmt: skip
    secrets = [TOKEN, auth[1], CREDENTIAL, headers["webhook-signature"]]
    secrets.append(secrets[-1][3:])
    echoed = "\n".join(f"<p>{name}: {encode(secret)}</p>" for name, secret in enumerate(secrets))
    masked = mask_secrets(echoed, sent_secrets(headers, "", auth))
    assert masked == "\n".join(f"<p>{name}: {encode('******')}</p>" for name in range(5))


@pytest.mark.parametrize("encode", ENCODERS)
def test_a_secret_another_holds_is_masked_alone(encode: Any) -> None:
    """The MAC without its signature, the credentials without their scheme: a secret is
    looked for whether or not the one holding it is there."""
    auth = ("Authorization", f"Bearer {CREDENTIAL}")
    headers = request_headers(
        event="BUILD_END", delivery_id="p:e.1", body=b"{}", token=TOKEN, user_agent="t",
        auth_header=auth,
    )  # fmt: skip
    secrets = sent_secrets(headers, "", auth)
    for inner in (CREDENTIAL, headers["webhook-signature"][3:]):
        assert mask_secrets(f"<p>{encode(inner)}</p>", secrets) == f"<p>{encode('******')}</p>"


def test_an_escape_of_another_text_is_left_as_it_came() -> None:
    """What looks like a secret but is not one of its forms stays: another character in
    its place, an escape of another character, a part of it."""
    secrets = sent_secrets({"X-DEVOPS-WEBHOOK-TOKEN": TOKEN})
    text = html.escape(TOKEN.replace("&", "+")) + " " + json.dumps(TOKEN[:-1]) + " " + TOKEN[4:]
    text += " " + TOKEN.replace("/", "\\u002e")
    assert mask_secrets(text, secrets) == text


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


@pytest.mark.parametrize("encode", [str, *ENCODERS])
@pytest.mark.parametrize("secret", [TOKEN, CREDENTIAL])
def test_a_secret_across_the_cut_leaves_nothing_of_itself(encode: Any, secret: str) -> None:
    """`mask_cut` keeps `limit` bytes of what was read past them: a secret (in any form)
    that the cut falls inside, wherever, is masked whole, where it began."""
    form = encode(secret).strip('"')  # JSON's quotes are not the secret's
    limit = 100
    for at in range(len(form) + 1):  # characters of the form before the cut
        text = "x" * (limit - at) + form + " and more"
        kept = mask_cut(text.encode(), limit, [secret])
        assert kept == "x" * (limit - at) + ("******" if at else ""), (at, kept)


def test_what_the_cut_keeps_is_as_it_came_when_no_secret_is_across_it() -> None:
    """A character across the cut (its UTF-8 bytes apart) is left out, and a secret
    wholly before the cut is masked as anywhere."""
    body = ("é" * 40 + " " + TOKEN + " " + "é" * 40).encode()
    for after in range(20):  # bytes kept after the token and a space: 10 "é", a cut one
        kept = mask_cut(body, len(TOKEN) + 82 + after, [TOKEN])
        assert kept == "é" * 40 + " ****** " + "é" * (after // 2)


@pytest.mark.parametrize(
    "encode",
    [
        lambda s: s,
        lambda s: json.dumps(s)[1:-1],
        lambda s: json.dumps(s)[1:-1].replace("/", "\\/"),
        lambda s: json.dumps(s)[1:-1].replace("&", "\\u0026").replace("<", "\\u003c"),
        html.escape,
        lambda s: html.escape(s, quote=False).replace("'", "&#39;").replace('"', "&#34;"),
        lambda s: html.escape(s, quote=False).replace("'", "&#039;").replace('"', "&quot;"),
        lambda s: "".join(f"\\u{ord(c):04x}" if c in "=&<>'" else c for c in json.dumps(s)[1:-1]),
    ],
    ids=["as-sent", "json", "php", "go", "html", "markupsafe", "htmlspecialchars", "gson"],
)
def test_a_secret_of_many_escapable_characters_is_masked_in_one_pass_per_form(
    encode: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret holding more than `MOST_ESCAPABLE` characters an encoder escapes is masked
    in the forms the common encoders give it, each in one linear pass, never by the
    pattern of every mix of escapes, whose scan costs the text's length times those
    characters: a project's auth header value of 4,096 slashes, echoed, made each attempt
    take 2.7 s of the worker's loop, every project waiting (review). What the read brought
    past the cut and the widest form of the longest secret is not masked either."""
    secret = "tok/" + "/&<\"'=" * 800 + "end"

    def no_pattern(secret: str) -> Any:
        raise AssertionError(f"a pattern of {len(secret)} characters")

    monkeypatch.setattr(masking, "_pattern", no_pattern)
    secrets = sent_secrets({}, "", ("X-Auth", secret))
    echoed = "x" * 100 + encode(secret) + "y" * 100
    assert mask_secrets(echoed, secrets) == "x" * 100 + MASK + "y" * 100
    flood = ("/" * 4095 + "x").encode() * 32  # 128 KB: one read of a receiver's
    kept = mask_cut(flood, 20_000, sent_secrets({}, "", ("X-Auth", "/" * 4096)))
    assert kept == flood[:20_000].decode()


def test_a_secret_holding_a_backslash_is_never_masked_by_the_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backslash may stand as itself or as JSON's `\\\\`: in the pattern a run of them
    matches in 2^n ways, tried at every place (a token of 12 backslashes and a letter took
    1.7 s a secret on 20 KB of backslashes, 8.4 s an attempt: review). Such a secret is
    masked in the common forms, each in one linear pass."""

    def no_pattern(secret: str) -> Any:
        raise AssertionError(f"a pattern of {secret!r}")

    monkeypatch.setattr(masking, "_pattern", no_pattern)
    secret = "\\" * 12 + "a"
    flood = ("\\" * 24 + "b") * 800
    assert mask_secrets(flood + "a", [secret]) == flood + "a"
    for form in (secret, json.dumps(secret)[1:-1]):
        assert mask_secrets(f"x{form}y", [secret]) == f"x{MASK}y"


def test_forms_standing_over_one_another_are_masked_whole() -> None:
    """The forms of a secret are found in the text as it came and masked as one where they
    overlap or touch: replaced one after another, PHP's form of `/abcdefgh+<\\` (the
    longest, first), found where the secret as sent ended and its PHP form began, left the
    one as sent standing but its last character (review)."""
    secret = "/abcdefgh+<\\"
    php = json.dumps(secret)[1:-1].replace("/", "\\/")
    assert mask_secrets(secret + php, [secret]) == MASK
    assert mask_secrets(f"a {secret} b {php} c", [secret]) == f"a {MASK} b {MASK} c"
    assert mask_secrets("nothing of it", [secret]) == "nothing of it"


def lower_hex(url: str) -> str:  # `%2f`, as some encoders write it
    return re.sub("%[0-9A-F]{2}", lambda escape: escape.group().lower(), url)


@pytest.mark.parametrize(
    "encode",
    [
        lambda s: quote(s, safe=""),
        lambda s: quote_plus(s, safe=""),
        lambda s: lower_hex(quote(s, safe="")),
        lambda s: lower_hex(quote_plus(s, safe="")),
        # Java's URLEncoder keeps `*` and escapes `~`; PHP's urlencode escapes both;
        # JavaScript's encodeURIComponent keeps `!~*'()` (review)
        lambda s: quote_plus(s, safe="*").replace("~", "%7E"),
        lambda s: quote_plus(s, safe="").replace("~", "%7E"),
        lambda s: quote(s, safe="!~*'()"),
    ],
    ids=["quote", "quote-plus", "quote-lower", "quote-plus-lower", "java", "php", "js"],
)
@pytest.mark.parametrize(
    "secret",
    [
        "tok/en+value==",  # the review's: by the pattern
        "Bearer abc/def+ghi==",  # a space: `%20` or `+`
        "pässwörd/0123 €",  # UTF-8 bytes escaped one by one
        "tok/" + "/&<\"'= " * 4 + "end",  # more than MOST_ESCAPABLE: by its forms
        "\\back\\slash%",  # a backslash: by its forms; `%` escaped at its end
        "Zx9/+Qa!b~c*D/e+" + "/(')*~!" * 3,  # by its forms, what encoders keep or not
    ],
    ids=["token", "auth-value", "non-ascii", "many-escapable", "backslash", "kept-apart"],
)
def test_a_secret_is_masked_as_urls_encode_it(encode: Any, secret: str) -> None:
    """A receiver echoing a query or a form it was sent (`token=tok%2Fen%2Bvalue%3D%3D`),
    its hex digits in either case and a space as `+`, showed the secret to every member on
    the attempt's page: only JSON's and HTML's escapes were looked for (review)."""
    form = encode(secret)
    assert form != secret
    echoed = f"rejected: token={form}&other=1"
    assert mask_secrets(echoed, [secret]) == f"rejected: token={MASK}&other=1"
    assert mask_cut(echoed.encode(), len(echoed) - 12, [secret]) == f"rejected: token={MASK}"
