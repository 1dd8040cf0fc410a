"""The forms common encoders give a secret that holds many characters they escape: as
sent, as JSON, PHP, Go, .NET and Gson escape it, as HTML writes it, and as URLs' encoders
write it (`forms`); `dispatcher.masking` looks for each of them in what a receiver
answered, in one linear pass a form."""

from __future__ import annotations

import functools
import html
import json
import re
import string

__all__ = ["ESCAPABLE", "MOST_ESCAPABLE", "by_forms", "forms"]

# A secret holding more characters that encoders escape than this (any but an ASCII letter
# or digit: `masking._pattern` escapes every non-ASCII one, `é` as `&#233;`), or a
# backslash (its two forms, `\\` and `\\\\`, make a run of them match in 2^n ways), is
# masked in the forms common encoders give it (`forms`), not in every mix of escapes (the
# pattern): the pattern's scan costs the text's length times those characters, and a
# project chooses its secrets (an auth header value of 4,096 slashes made each attempt take
# 2.7 s of the worker's loop, every project's deliveries waiting: review). At this many,
# 20 KB of text made to match almost everywhere costs ~5 ms a secret at worst, and an
# attempt's masking stops at `masking.MASKING_CPU` (a random token of 64 visible ASCII
# characters holds ~20 such characters; one of letters, digits and base64's, a few).
MOST_ESCAPABLE = 12
ESCAPABLE = re.compile(r"[^A-Za-z0-9]")


@functools.lru_cache(maxsize=1024)
def by_forms(secret: str) -> bool:
    """Whether `secret` is masked in its common forms (`forms`), not by `masking._pattern`."""
    return "\\" in secret or len(ESCAPABLE.findall(secret)) > MOST_ESCAPABLE


@functools.lru_cache(maxsize=256)
def forms(secret: str) -> tuple[str, ...]:
    """`secret` as sent and as JSON (standard, PHP's `\\/`, Go's `\\u0026` for `&<>`,
    .NET's `\\u002B` for `+&<>'"` and the backtick, Gson's `\\u003d` for `=&<>'`), HTML
    (`&<>` escaped, each quote as itself or any of its references) and URLs write it (`%2F`
    or `%2f` for each byte of UTF-8 but a letter, digit or what the encoder keeps; a space
    as `%20` or `+`: `_url_forms`; a receiver echoing a query or a form showed it to every
    member: review)."""
    standard = json.dumps(secret)[1:-1]
    go = standard.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    dotnet, gson = standard.replace('\\"', "\\u0022"), standard
    for c in "+&<>'`":
        dotnet = dotnet.replace(c, f"\\u{ord(c):04X}")
    for c in "=&<>'":
        gson = gson.replace(c, f"\\u{ord(c):04x}")
    found = [secret, standard, standard.replace("/", "\\/"), go, dotnet, gson]
    bare = html.escape(secret, quote=False)  # then each way HTML writes the quotes
    for single in ("&#x27;", "&#39;", "&#039;", "&apos;", "'"):
        for double in ("&quot;", "&#34;", '"'):
            found.append(bare.replace("'", single).replace('"', double))
    found += _url_forms(secret)
    return tuple(form for form in dict.fromkeys(found) if form)


def _url_forms(secret: str) -> list[str]:
    """`secret` as each encoder of `_KEPT` writes it, hex in either case, a space as `%20`
    and as `+` when it holds one: one `str.translate` a case (every byte escaped but a
    letter, digit or `-._`), then the escapes of what an encoder keeps put back, only of
    those characters the secret holds (C-level `replace`: a `%` of the secret is `%25`, so
    each `%XY` found is an escape). A translate a form (16) took 2-3 ms for 4,096 random
    characters, and a normal echo of such an auth header was withheld (review)."""
    utf8 = secret.encode(errors="surrogatepass").decode("latin-1")  # a character a byte
    differ, found = set(secret) & _KEPT_BY_SOME, []
    for case in "Xx":
        base = utf8.translate(_ESCAPED[case])
        for kept in _KEPT:
            form = base
            for c in differ & kept:
                form = form.replace(f"%{ord(c):02{case}}", c)
            found.append(form)
            if " " in secret:
                found.append(form.replace("%20", "+"))
    return found


def _escaped(case: str) -> dict[int, str]:
    """A `str.translate` table from a byte (as a character of latin-1) to itself when a
    letter, a digit or one of `-._` (which every encoder keeps), else `%XY` in `case`."""
    table = {byte: f"%{byte:02{case}}" for byte in range(256)}
    table.update((ord(c), c) for c in string.ascii_letters + string.digits + "-._")
    return table


# What the common encoders keep as it is besides letters, digits and `-._`: Python's
# `quote`, PHP's `rawurlencode` and Go's `QueryEscape` (`~`); Java's `URLEncoder` (`*`);
# PHP's `urlencode` (none); JavaScript's `encodeURIComponent` (`!~*'()`). Python's alone
# missed a token Java, PHP or JavaScript echoed (review).
_KEPT_BY_SOME = frozenset("~*!'()")
_KEPT = tuple(map(frozenset, ("~", "*", "", "!~*'()")))
_ESCAPED = {case: _escaped(case) for case in "Xx"}
