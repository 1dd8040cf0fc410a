"""A callback URL as others than its project read it, in log lines and spans: a token in
its query string (`?access_token=…`, how some receivers take their secret) or credentials
in it stay out of both. One function, so that the two never differ."""

from __future__ import annotations

import functools
from urllib.parse import SplitResult, urlsplit

__all__ = ["REDACTED", "redacted", "redacted_url"]

REDACTED = "REDACTED"


@functools.lru_cache(maxsize=4096)  # a worker's callbacks: read once each, not per attempt
def redacted_url(url: str) -> str | None:
    """`url` with its credentials and every query value replaced by `REDACTED`, without its
    fragment; None when it cannot be parsed (the caller says what to show then)."""
    try:
        return redacted(urlsplit(url))
    except ValueError:
        return None


def redacted(parts: SplitResult) -> str:
    """`redacted_url` of a URL split already (`registry.rules.destination` keeps it with
    each callback: a fan-out to 10,000 URLs parsed each again for its log line)."""
    netloc = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        netloc = f"{REDACTED}:{REDACTED}@{netloc}"
    query = "&".join(
        item.partition("=")[0] + "=" + REDACTED for item in parts.query.split("&") if item
    )
    return parts._replace(netloc=netloc, query=query, fragment="").geturl()
