"""Hostile input, without Redis or a network: an attempt's branches when something raises
(a stand-in HTTP client), the checks of tokens, URLs, event ids and data, the address
policy's cloud-metadata rules, masking on read, and the cut of a receiver's answer to what
it takes in a record."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import random
from collections.abc import AsyncIterator, Callable, Mapping
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.http import HttpVersion11
from aiohttp.http_parser import RawResponseMessage
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from dispatcher import egress, lane_ids, tracing
from dispatcher.backoff import parse_retry_after
from dispatcher.delivery import MAX_ERROR, AttemptResult, Outcome, send
from dispatcher.egress import AddressPolicy
from dispatcher.errors import InvalidInput, describe
from dispatcher.events import event_job
from dispatcher.headers import check_header_value, unsendable
from dispatcher.history.window import json_size, truncate_json
from dispatcher.lane_ids import lane_id
from dispatcher.models import HistoryRecord, Region
from dispatcher.registry import CallbackTarget
from dispatcher.registry.rules import check_token, destination, url_problem, validate_url
from dispatcher.settings import Settings
from dispatcher.worker.record import _loggable

SECRET = "TOPSECRET"


class Client:
    """A stand-in for a region's HTTP client: `answer` makes each response (or raises)."""

    def __init__(self, answer: Callable[[], Any]) -> None:
        self.answer = answer

    def post(self, url: URL, body: bytes, headers: Mapping[str, str], timeout: Any) -> Any:
        @contextlib.asynccontextmanager
        async def response() -> AsyncIterator[Any]:
            yield self.answer()

        return response()


async def attempt(client: Client, **headers: str) -> AttemptResult:
    return await send(
        client,
        "http://receiver.example/hook",
        b"{}",
        {"X-A": "b", **headers},
        connect_timeout=1,
        total_timeout=2,
        max_response_body=100,
    )


async def test_anything_the_client_raises_ends_as_a_result_without_its_message() -> None:
    def explode() -> None:
        raise RuntimeError(f"choked on {SECRET}")

    result = await attempt(Client(explode))
    assert result.outcome is Outcome.RETRY and result.error is not None
    assert result.error.startswith("RuntimeError at ") and SECRET not in result.error


async def test_a_client_errors_message_is_kept_on_one_short_line() -> None:
    """A message no branch names (the client's own words, trusted) may still quote what a
    peer said: kept to `MAX_ERROR` characters, control characters escaped."""

    def explode() -> None:
        raise aiohttp.ClientOSError("peer said:\n\x1b[31m" + "Z" * 5000)

    result = await attempt(Client(explode))
    assert result.outcome is Outcome.RETRY and result.error is not None
    assert result.error.startswith("ClientOSError: peer said:\\n\\x1b[31mZZZ")
    assert result.error.endswith("Z... [cut]") and len(result.error) == MAX_ERROR + 9
    assert result.error.isprintable()


CLOSED = "ServerDisconnectedError: the receiver closed the connection before its answer was"
HEAD = RawResponseMessage(  # what aiohttp had parsed of an answer when the peer closed
    HttpVersion11, 200, SECRET, CIMultiDictProxy(CIMultiDict({"X-Echo": SECRET})),
    ((b"X-Echo", SECRET.encode()),), False, None, False, False,
)  # fmt: skip


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (aiohttp.ServerDisconnectedError(HEAD), CLOSED),
        (aiohttp.ServerDisconnectedError(), CLOSED),
        (aiohttp.ClientOSError(SimpleNamespace(said=SECRET)), "ClientOSError at "),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), "ClientOSError: [Errno 104] Conn"),
    ],
)
async def test_a_client_errors_message_is_kept_only_when_it_is_made_of_words(
    error: Exception, said: str
) -> None:
    """A client error's message is its `args`: what is not a string (or a number), such as
    the message a `ServerDisconnectedError` holds, says the answer (its reason phrase, its
    header values, quoted by `repr`, where masking could not find a token holding both
    quotes). That error is said in fixed words; another one by its type and place."""

    def explode() -> None:
        raise error

    result = await attempt(Client(explode))
    assert result.outcome is Outcome.RETRY and result.error is not None
    assert result.error.startswith(said) and SECRET not in result.error, result.error


async def test_an_answer_whose_reading_raises_is_judged_by_its_status() -> None:
    class Broken:
        async def iter_any(self) -> AsyncIterator[bytes]:
            raise ValueError(SECRET)
            yield b""  # an async generator, that raises at once

    def answer() -> Any:
        retry_after = "\u00b2"  # `isdigit()` says yes, `float()` raises
        headers = CIMultiDict({"Retry-After": retry_after})
        return SimpleNamespace(status=503, headers=headers, content=Broken())

    result = await attempt(Client(answer))
    assert (result.outcome, result.status_code, result.retry_after) == (Outcome.RETRY, 503, None)
    assert result.error is not None and SECRET not in result.error


@pytest.mark.parametrize("value", ["p\u00e4ss-" + SECRET, "a\r\nX-Evil: " + SECRET, SECRET + "\0"])
async def test_a_request_that_cannot_be_built_fails_for_good_without_its_value(
    value: str,
) -> None:
    def never() -> None:
        raise AssertionError("nothing may be sent")

    result = await attempt(Client(never), **{"X-DEVOPS-WEBHOOK-TOKEN": value})
    assert result.outcome is Outcome.FAILED and result.error is not None
    assert result.error.startswith("the request could not be built: ")
    assert SECRET not in result.error


async def send_through_aiohttp(url: str, proxy: str | None = None) -> AttemptResult:
    """`send` through a real aiohttp session (no request leaves: each URL here fails first)."""
    async with aiohttp.ClientSession(proxy=proxy) as session:

        class Real:
            def post(self, url: URL, body: bytes, headers: Any, timeout: Any) -> Any:
                return session.post(url, data=body, headers=headers, timeout=timeout)

        return await send(
            Real(), url, b"{}", {}, connect_timeout=1, total_timeout=2, max_response_body=100
        )


async def test_a_url_that_is_not_http_fails_for_good() -> None:
    result = await send_through_aiohttp("ftp://receiver.example/hook")
    assert result.outcome is Outcome.FAILED and result.error is not None
    assert result.error.startswith("the request could not be built: ")


@pytest.mark.parametrize(
    ("url", "proxy", "outcome"),
    [
        ("http://127.0.0.1:9/hook", "ops:s3cret@proxy.internal:3128", Outcome.RETRY),
        ("http://2130706433/hook", None, Outcome.FAILED),  # the callback's own host
        ("http:///hook", None, Outcome.FAILED),
    ],
)
async def test_an_invalid_url_fails_for_good_only_when_it_is_the_callbacks(
    url: str, proxy: str | None, outcome: Outcome
) -> None:
    """aiohttp says InvalidURL of the target and of the proxy alike: a proxy's fault (the
    operator's, had settings let it by) must not dead-letter the region's deliveries, nor
    show the proxy's URL in a tenant's history."""
    result = await send_through_aiohttp(url, proxy)
    assert result.outcome is outcome and result.error is not None
    assert "s3cret" not in result.error and "proxy.internal" not in result.error
    if outcome is Outcome.RETRY:
        assert "DISPATCHER_REGION_PROXIES" in result.error


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_login_goes_to_the_proxy_never_into_the_tunnel(scheme: str) -> None:
    """Through a proxy, an http:// request is the proxy's to read: the login rides on it.
    An https:// one goes through a tunnel to the receiver: the login rides on the CONNECT
    alone (`proxy_headers`), never on the request inside."""
    settings = Settings(region_proxies={Region.IDC: "http://ops:s%40cret@squid.corp:3128"})
    client = egress.Client(settings, Region.IDC)
    sent: dict[str, Any] = {}

    class Session:
        def post(self, url: URL, **kwargs: Any) -> None:
            sent.update(kwargs)

    client._session = Session()  # type: ignore[assignment]  # what aiohttp is handed
    client.post(URL(f"{scheme}://receiver.example/hook"), b"{}", {"X-A": "1"}, None)  # type: ignore[arg-type]
    login = "Basic " + base64.b64encode(b"ops:s@cret").decode()
    assert client.proxy == URL("http://squid.corp:3128")  # the login out of the URL
    if scheme == "https":
        assert sent["proxy_headers"] == {"Proxy-Authorization": login}
        assert sent["headers"] == {"X-A": "1"}
    else:
        assert sent["proxy_headers"] is None
        assert sent["headers"] == {"X-A": "1", "Proxy-Authorization": login}


def test_describe_names_the_type_and_place_never_the_message() -> None:
    try:
        "p\u00e4ss-TOPSECRET".encode("ascii")
    except UnicodeEncodeError as exc:
        text = describe(exc)
    assert text.startswith("UnicodeEncodeError at test_hostile_units.py:") and SECRET not in text
    assert describe(InvalidInput("ours")) == "InvalidInput: ours"
    assert describe(OSError("refused"), trusted=(OSError,)) == "OSError: refused"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), (" 7 ", 7.0), ("\u00b2", None), ("\u0661\u0662", None), ("1e3", None),
     ("-1", None), ("0x10", None), ("99999999999", None), ("Wed, 21 Oct 99999 07:28:00 GMT", None)],
)  # fmt: skip
def test_retry_after_is_ascii_digits_or_an_http_date(value: str, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize(
    "token", ["p\u00e4ss", "a\r\nb", "a\nb", "a\x00b", "a\tb", "a\x7fb", " edge", "edge ", ""]
)
def test_a_token_must_be_visible_ascii(token: str) -> None:
    if not token:
        assert check_token(token) == ""
        return
    with pytest.raises(InvalidInput) as refused:
        check_token(token)
    assert refused.value.param == "secretToken" and token not in refused.value.message


def test_visible_ascii_with_spaces_between_is_a_valid_header_value() -> None:
    assert check_header_value("Bearer abc.def~!", "authHeaderValue", 100) == "Bearer abc.def~!"
    assert unsendable("Bearer  abc", None) is None  # what older versions stored and can go
    assert unsendable("a\tb", ("X-Key", "v")) is None
    assert "secretToken" in (unsendable("a\r\nb", None) or "")
    assert "authHeaderValue" in (unsendable("", ("X-Key", "\u00e4")) or "")
    assert "authHeaderValue" in (unsendable("", ("Bad Name", "v")) or "")


@pytest.mark.parametrize(
    ("url", "word"),
    [
        ("http://u:S3cr3tPw@h.example/", "credentials"),
        ("http://u@h.example/", "credentials"),
        ("http://h.example/%1B[31m", "control"),
        ("http://h.example/%00", "control"),
        ("http://h.example/a%0d%0ab", "control"),
        ("http://h.example/a%C2%85b", "control"),
        ("http://h.example/a\x1bb", "control"),
        ("http://h.example/a\u202eb", "control"),
    ],
)
def test_url_problems_never_quote_the_url(url: str, word: str) -> None:
    problem = url_problem(url)
    assert problem is not None and word in problem and "S3cr3tPw" not in problem
    with pytest.raises(InvalidInput) as refused:
        validate_url(url)
    assert refused.value.param == "url" and url not in refused.value.message


def test_urls_without_problems_pass() -> None:
    for url in ("http://h.example/users/a@b", "https://h.example/p?q=%20ok&r=%C3%A4",
                "http://[::1]:8080/x"):  # fmt: skip
        assert url_problem(url) is None and validate_url(url) == url
    with pytest.raises(InvalidInput, match="percent-encoded host"):
        validate_url("http://metadata%2Egoogle%2Einternal/")


def test_a_destination_is_what_the_attempt_keys_and_checks_on() -> None:
    """One parse of a callback's URL: its share's and circuit's key, the host and port the
    egress policy checks (the scheme's port when none is given), its problem, and the URL a
    log line shows (query values redacted, no fragment)."""
    assert destination("http://H.example:8080/p?q=s") == (
        None, "h.example:8080", "h.example", 8080, "http://H.example:8080/p?q=REDACTED"
    )  # fmt: skip
    assert destination("https://[::1]/x#f") == (None, "[::1]:443", "::1", 443, "https://[::1]/x")
    # one host however it is spelled: one share, one circuit, as one connection pool
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "hooks")  # NFKC: hooks
    spellings = (
        "http://HOOKS.example/a",
        "http://hooks.example:80/b",
        f"http://{full_width}.example/",
    )
    assert {destination(url).host for url in spellings} == {"hooks.example:80"}
    assert destination("https://hooks.example/").host == "hooks.example:443"
    assert destination("http://h.example/a%1Bb").problem == url_problem("http://h.example/a%1Bb")
    for url, netloc in (("http://[::1/x", ""), ("http://h.example:99999/", "h.example:99999"),
                        ("http://h.example:port/", "h.example:port")):  # fmt: skip
        problem, parsed, *_ = destination(url)
        assert problem is not None and problem.startswith("url is malformed"), url
        assert parsed == netloc, url  # credentials in it are still seen (and masked)
    assert (destination("http://u:pw@h.example:99999/").problem or "").startswith("url must not")


@pytest.mark.parametrize(
    "url",
    [
        "http://svc:S3cr3tPw@127.0.0.1:8080/u",
        "http://u:pa/S3cr3tPw@h.example/",  # a '/' in the password: no port to read
        "http://u:S3cr3tPw@h.example:99999/",  # credentials and a port out of range
        "http:/u:S3cr3tPw@h.example/",  # one slash: no host (stored by an older version)
        "http:\\\\u:S3cr3tPw@h.example/",
        "http://u:p@S3cr3tPw@h.example/",  # several '@'
        "http://[::1/u:S3cr3tPw@x",
        "http://h.example:x/?r=http://v:S3cr3tPw@o",
    ],
)
def test_a_log_line_never_shows_a_stored_urls_credentials(url: str) -> None:
    target = CallbackTarget(1, url, Region.OSS, "t")
    assert target.destination.problem is not None, url  # nothing is sent to it either
    assert "S3cr3tPw" not in _loggable(target)


def test_a_log_line_shows_a_good_url_as_a_span_does() -> None:
    for url, shown in (
        ("http://h.example/users/a@b", "http://h.example/users/a@b"),
        ("https://h.example/p?q=%20ok&r=a@b#f", "https://h.example/p?q=REDACTED&r=REDACTED"),
    ):
        target = CallbackTarget(1, url, Region.OSS, "t")
        assert target.destination.problem is None and _loggable(target) == shown
        assert tracing.url_attributes(url)["url.full"] == shown


@pytest.mark.parametrize("allow_internal", [False, True])
@pytest.mark.parametrize(
    "host",
    ["169.254.0.23", "[::ffff:169.254.0.23]", "[::ffff:a9fe:17]", "[::169.254.0.23]",
     "[64:ff9b::a9fe:17]", "[2002:a9fe:17::]", "[fe80::1]", "[fe80::1%25eth0]",
     "168.63.129.16", "192.0.0.192", "100.100.100.200", "[fd00:ec2::254]", "169.254.169.253",
     "2852039166", "0xa9.0xfe.0xa9.0xfe", "0251.0376.0251.0376", "169.254.43518",
     "metadata.google.internal", "Metadata.Google.Internal..", "x.metadata.google.internal",
     "metadata.goog", "metadata.azure.com", "metadata.tencentyun.com.", "instance-data",
     "INSTANCE-DATA.ec2.internal", "metadata"],
)  # fmt: skip
def test_cloud_metadata_is_refused_whatever_the_region_allows(
    allow_internal: bool, host: str
) -> None:
    refusal = AddressPolicy(allow_internal=allow_internal).refusal(f"http://{host}/")
    assert refusal is not None and "metadata" in refusal and "every region" in refusal


@pytest.mark.parametrize("allow_internal", [False, True])
@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.25\U0001fbf4",
        "\uff11\uff16\uff19.254.169.254",
        "169\u3002254\u3002169\u3002254",
    ],
)
async def test_an_address_in_other_digits_is_checked_as_the_one_connected_to(
    allow_internal: bool, host: str
) -> None:
    """yarl (and so aiohttp) reads segmented and full-width digits and ideographic full
    stops as an address's; the policy checks what it reads, at registration too."""
    refusal = AddressPolicy(allow_internal=allow_internal).refusal(f"http://{host}/")
    assert refusal is not None and "metadata" in refusal, refusal
    with pytest.raises(InvalidInput, match="metadata"):
        await AddressPolicy(allow_internal=allow_internal).check_resolved(f"http://{host}/")


@pytest.mark.parametrize("host", ["134744072", "8.8.2056", "010.8.8.8", "0x8.8.8.8", "8.8.8.8."])
def test_an_ipv4_address_written_another_way_is_refused_with_its_usual_form(host: str) -> None:
    """aiohttp refuses to send to them (`is not a canonical IPv4 address`), so each
    delivery failed; the registration was accepted (review)."""
    refusal = AddressPolicy().refusal(f"http://{host}/")
    assert refusal is not None and "write it 8.8.8.8" in refusal, refusal
    assert AddressPolicy().refusal("http://8.8.8.8/") is None


@pytest.mark.parametrize("port", ["+22", "\uff12\uff12"])
def test_a_port_urlsplit_cannot_read_is_malformed_though_yarl_reads_it(port: str) -> None:
    """yarl reads `+22` and full-width digits as port 22: the URL is malformed, at
    registration and at delivery, rather than checked (or sent) as something else."""
    url = f"http://example.com:{port}/"
    with pytest.raises(InvalidInput, match="url is malformed"):
        AddressPolicy().check_url(url)
    assert (destination(url).problem or "").startswith("url is malformed")


def test_internal_targets_stay_an_operator_choice() -> None:
    for host in ("10.0.0.5", "127.0.0.1", "[::ffff:10.0.0.5]", "100.64.0.1", "[fd00::1]"):
        assert AddressPolicy(allow_internal=True).refusal(f"http://{host}/") is None, host
        assert "internal" in (AddressPolicy().refusal(f"http://{host}/") or ""), host
    for host in ("example.com", "metadata.example.com", "8.8.8.8", "[2002:808:808::]"):
        assert AddressPolicy().refusal(f"http://{host}/") is None, host


def test_resolved_addresses_are_checked_in_their_ipv4_form() -> None:
    policy = AddressPolicy(allow_internal=True)
    with pytest.raises(InvalidInput, match="metadata"):
        policy.check_address(ipaddress.ip_address("::ffff:169.254.169.254"), "rebound.example")


@pytest.mark.parametrize("event_id", ["nl-batch\n", "x\r", "a b", "", "x" * 129, "\u00e4"])
def test_event_ids_are_matched_whole(event_id: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        event_job("demo", "BUILD_END", {}, event_id)
    assert refused.value.param == "eventId"


@pytest.mark.parametrize("project_id", ["a\r\nb", "p\u00e4", "a b", "a:b", "x" * 129])
def test_an_emitting_project_id_can_go_out_as_a_header(project_id: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        event_job(project_id, "BUILD_END", {})
    assert refused.value.param == "projectId"


@pytest.mark.parametrize(
    "data", [{"a": float("nan")}, {"a": [1, {"b": float("inf")}]}, {"a": (float("-inf"),)}]
)
def test_nan_and_infinity_are_refused_wherever_they_are(data: dict[str, object]) -> None:
    with pytest.raises(InvalidInput, match="NaN") as refused:
        event_job("demo", "BUILD_END", data)
    assert refused.value.param == "data"
    assert event_job("demo", "BUILD_END", {"a": None, "b": 1.5}).data == {"a": None, "b": 1.5}


def test_history_masks_secret_headers_on_read() -> None:
    record = HistoryRecord.model_validate({
        "id": 1, "projectId": "p", "callBackUrl": "u", "events": "BUILD_END",
        "status": "FAILED", "startTime": 0, "endTime": 0, "createdTime": 0,
        "requestHeaders": [
            {"name": "WEBHOOK-SIGNATURE", "value": "v1,abc"},
            {"name": "x-devops-webhook-token", "value": "t"},
            {"name": "Authorization", "value": "Bearer t"},
            {"name": "webhook-id", "value": "evt_1.1"},
        ],
    })  # fmt: skip
    assert [h.value for h in record.request_headers] == ["******"] * 3 + ["evt_1.1"]


def test_an_answer_is_cut_to_the_longest_start_that_fits_in_the_record() -> None:
    """Whatever its characters (each takes 1 to 6 bytes in a record's JSON), the text kept
    is a start of the answer, takes at most the limit, and one more character would not
    fit; what fits is not cut."""
    alphabet = 'a"\\\x01\n\x7f\u00e9\ufffd\U0001f600u0'
    rng = random.Random(7)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        limit = rng.randrange(60)
        kept, cut = truncate_json(text, limit)
        assert text.startswith(kept) and json_size(kept) <= limit, (text, limit)
        assert cut == (kept != text)
        assert not cut or json_size(text[: len(kept) + 1]) > limit, (text, limit)
    assert truncate_json("x" * 20_000, 20_000) == ("x" * 20_000, False)
    assert truncate_json("\x01" * 20_000, 20_000) == ("\x01" * 3_333, True)


def test_a_long_order_key_is_hashed_once_per_event_not_per_callback() -> None:
    """A project's 1 MiB orderBy value to many ordered callbacks: its lane key's hash is
    made once (~1.1 ms each: a chunk of 500 callbacks held the loop ~0.55 s; review), and
    each callback's lane is what hashing it each time names."""
    value = "v" * (1 << 20)
    lane_ids._long_key.cache_clear()
    lanes = [lane_id("proj", f"https://h/{n}", "buildId", "proj", value) for n in range(500)]
    assert lane_ids._long_key.cache_info().misses == 1
    digest = hashlib.blake2b(value.encode(), digest_size=16).hexdigest()
    assert {lane.rsplit(":", 1)[1] for lane in lanes} == {f"#{digest}"}
    assert len(set(lanes)) == 500  # one per callback, as before
