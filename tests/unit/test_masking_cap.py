"""The cap on an attempt's masking (`masking.MASKING_CPU`): a pattern's scan goes in windows
and finds what one `sub` over the whole text finds; past the budget the text is withheld
whole. No timing here: the budget is made nothing, or the clock a counter."""

from __future__ import annotations

import html
import json
import random
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from dispatcher import masking, secret_forms
from dispatcher.headers import sent_secrets
from dispatcher.masking import WITHHELD, Budget, mask_cut, mask_secrets
from dispatcher.models import MASK
from tests.helpers import compiling_costs

# what a secret is made of: letters and digits, what encoders escape, non-ASCII (a form of
# `😀` is 11 characters: `&#x001f600;`), a backslash (masked by forms, not by the pattern)
LETTERS = "aZ9"
OTHERS = "&/<>'\"=+-_ é😀"


def forms(c: str) -> list[str]:
    """Each way `_pattern` may find `c` written (a letter or digit only as itself)."""
    if c.isascii() and c.isalnum():
        return [c]
    code = ord(c)
    named = {'"': "&quot;", "&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;"}
    found = [c, "\\" + c, f"\\u{code:04x}", f"\\u{code:04X}", f"&#x{code:x};", f"&#X00{code:X};"]
    found += [f"&#{code};", f"&#00{code};", named.get(c, c)]  # the widest: `&#X00` or `&#00`
    return found


def written(rng: random.Random, secret: str) -> str:
    """`secret` in a mix of escapes, one chosen for each character; a third of the time
    each character in its widest form (`&#x0026;`): as far as a match may reach."""
    if rng.random() < 0.3:
        return "".join(max(forms(c), key=len) for c in secret)
    return "".join(rng.choice(forms(c)) for c in secret)


def texts(rng: random.Random, secret: str) -> Iterator[str]:
    """Texts to mask: the secret written in mixes of escapes, cut short, touching letters
    (a short secret stands alone or not), amid other characters; floods of its first
    characters escaped (matches almost everywhere, and their attempts at every place)."""
    for _ in range(6):
        parts = []
        for _ in range(rng.randrange(1, 12)):
            form = written(rng, secret)
            parts.append(rng.choice([form, form, form[: rng.randrange(len(form) + 1)]]))
            parts.append("".join(rng.choices(LETTERS + OTHERS + "; ", k=rng.randrange(4))))
        yield "".join(parts)
    head = written(rng, secret[: max(1, len(secret) // 2)])
    yield head * rng.randrange(2, 40) + written(rng, secret)
    yield (written(rng, secret) + rng.choice(["", "a", "&"])) * rng.randrange(2, 30)


def secrets(rng: random.Random) -> Iterator[str]:
    for _ in range(300):
        length = rng.choice([1, 2, 3, 5, 7, 8, 9, 12, 20, 40])
        secret = "".join(rng.choices(LETTERS + OTHERS, k=length))
        if not secret_forms.by_forms(secret):  # else: by forms
            yield secret
    yield from ("a&" * 6 + "Zq8Zq8Zq8Zq8", "&a" * 12, "x&y", "😀" * 3, "é&é")


def test_a_windowed_scan_masks_what_one_sub_over_the_text_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pattern's scan looks at the budget every `WINDOW` characters: it takes a match
    that starts inside the window, searching past the window's end as far as the widest
    form of the secret and the character after it (`_reach`), and goes on after it. For
    every text here, at every window from 1 character up, it masks just what one
    `pattern.sub` over the whole text masks: a match across a window's end whole, a short
    secret's where a letter touches it past the window's end not at all."""
    monkeypatch.setattr(masking, "MASKING_CPU", float("inf"))
    rng, across, cases = random.Random(20240611), 0, 0
    for secret in secrets(rng):
        pattern = masking._pattern(secret)
        for text in texts(rng, secret):
            expected = pattern.sub(MASK, text)
            for window in (1, 2, 3, 5, 8, 13, 64, 4096):
                monkeypatch.setattr(masking, "WINDOW", window)
                assert masking._scan(text, secret, Budget()) == expected, (secret, text, window)
                cases += 1
                ends = range(window, len(text), window)  # the windows' ends
                across += any(m.start() < e < m.end() for m in pattern.finditer(text) for e in ends)
    assert cases > 10_000 and across > 5_000, (cases, across)
    print(cases, across)  # matches across the edges


@pytest.mark.parametrize(
    "text",
    [
        "x" * 5000 + "a&amp;" * 6 + "Zq8Zq8Zq8Zq8 and more",  # the pattern's, in windows
        "a&" * 3000 + html.escape("a&" * 6 + "Zq8Zq8Zq8Zq8"),
        "x" * 10 + json.dumps(html.escape("a&" * 6 + "Zq8Zq8Zq8Zq8")),  # one `sub`
    ],
    ids=["windows", "flood", "short"],
)
def test_masking_past_its_budget_withholds_the_whole_text(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project chooses its secrets and its receiver the text, which can be made to match
    almost everywhere: masking took ~5 ms of the worker's loop a secret on 20 KB, ~25 ms
    an attempt, ~50 ms past the read limit, each other project's deliveries waiting
    (review). Past its budget the text is withheld, nothing of it kept: the part not yet
    masked might hold a secret. Made nothing here, so each scan is past it."""
    secret = "a&" * 6 + "Zq8Zq8Zq8Zq8"
    assert mask_secrets(text, [secret]) != WITHHELD  # within the budget: masked
    assert secret not in mask_secrets(text, [secret])
    monkeypatch.setattr(masking, "MASKING_CPU", 0.0)
    assert mask_secrets(text, [secret]) == WITHHELD
    assert mask_cut(text.encode(), len(text) - 5, [secret]) == WITHHELD  # cut in the secret
    forms_secret = "/" * 13  # more than `MOST_ESCAPABLE`: masked in its common forms
    assert mask_secrets("/" * 20_000, [forms_secret]) == WITHHELD


def test_what_needs_no_scan_is_never_withheld(monkeypatch: pytest.MonkeyPatch) -> None:
    """A text of a window or less that holds no secret is kept as it came, and one that
    holds them only as sent is masked by `str.replace`: no budget to look at. A forms scan
    with more than 1,024 places within its budget masks as before."""
    token = "token-0123456789"
    text = '{"headers": {"X-DEVOPS-WEBHOOK-TOKEN": "token-0123456789"}}'
    monkeypatch.setattr(masking, "MASKING_CPU", 0.0)
    assert mask_secrets("nothing to hide " * 256, [token]) == "nothing to hide " * 256
    assert mask_secrets(text, sent_secrets({"X-DEVOPS-WEBHOOK-TOKEN": token})) == (
        '{"headers": {"X-DEVOPS-WEBHOOK-TOKEN": "******"}}'
    )
    monkeypatch.setattr(masking, "MASKING_CPU", float("inf"))
    flood = "x" + "/" * 5000 + "y" + "\\/" * 1500 + "z"
    assert mask_secrets(flood, ["/" * 13]) == f"x{MASK}y{MASK}z"


def test_an_attempts_texts_share_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is the attempt's, not each text's: its answer's head and whole
    (`mask_cut`) and its error spend one. The clock here goes 1 ms on at each look: texts
    that a new budget each masks are withheld once the one they share is spent."""
    ticks = iter(range(1_000_000))
    monkeypatch.setattr(time, "thread_time", lambda: next(ticks) / 1000)
    secret = "a&" * 6 + "Zq8Zq8Zq8Zq8"
    text = "x" * 10 + html.escape(secret)
    assert [mask_secrets(text, [secret]) for _ in range(10)] == ["x" * 10 + MASK] * 10
    budget = Budget()
    said = [mask_secrets(text, [secret], budget) for _ in range(10)]
    assert said[0] == "x" * 10 + MASK and said[-1] == WITHHELD, said
    assert said.index(WITHHELD) == said.count("x" * 10 + MASK)  # withheld from then on


# ---- a forms search, by the characters it checks ---------------------------------------


class Searched(str):
    """A text that counts what its searches (`str.find`) look at: the characters from
    where each starts to the place found (or to the end it was given), and the form's own,
    each checked whole at a place found; and the clock looked at in between."""

    searches: int
    looked: int
    looks: list[tuple[int, int]]

    def find(self, form: str, start: Any = 0, end: Any = None, /) -> int:
        found = super().find(form, start, end)
        stop = len(self) if end is None else min(end, len(self))
        self.searches += 1
        self.looked += (stop if found < 0 else found) - start + len(form)
        return found

    def clock(self) -> float:
        """`time.thread_time` of a clock that never moves: what was searched at each look."""
        self.looks.append((self.searches, self.looked))
        return 0.0


@pytest.mark.parametrize(
    ("secret", "answer"),
    [
        ('"' * 4096, "\\u0022" * 9000),  # .NET's form: 24,576 characters at each place
        ("<" * 4096, "&lt;" * 14_000),
        ("/" * 4096, "\\/" * 30_000),  # PHP's
        ("\\", "\\" * 50_000),  # a search at each place, each of one character
    ],
    ids=["dotnet-quotes", "html-lt", "php-slashes", "backslashes"],
)
def test_a_forms_search_looks_at_the_budget_by_what_it_checks(
    secret: str, answer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forms search looked at the budget every 1,024 places found, but each place is a
    form checked whole: 1,024 places of .NET's `\\u0022` for an auth header value of 4,096
    quotes were 25 M characters, 19 ms of the loop between two looks (the answer past the
    read limit: 20 ms an attempt; `&lt;` 21 ms, PHP's `\\/` 12 ms; review). It now looks
    once per `SEARCHED` characters searched or checked and `SEARCH` a search, each search
    over the places of one `WINDOW`: between two looks, at most that and one search."""
    text = Searched(answer)
    text.searches, text.looked, text.looks = 0, 0, []
    monkeypatch.setattr(masking, "time", SimpleNamespace(thread_time=text.clock))
    masked = mask_secrets(text, sent_secrets({}, "", ("X-Auth", secret)))
    assert masked != answer and not masked.strip(MASK), masked[:100]  # masked, all of it
    looks = [(0, 0), *text.looks, (text.searches, text.looked)]
    widest = max(map(len, secret_forms.forms(secret)))
    one_search = masking.WINDOW + 2 * widest
    for (searches, looked), (then, before) in zip(looks[1:], looks, strict=False):
        assert looked - before <= masking.SEARCHED + one_search, (looked - before, len(looks))
        assert searches - then <= masking.SEARCHED // masking.SEARCH + 1, searches - then


def reference_mask_forms(text: str, forms: Sequence[str]) -> str:
    """`_mask_forms` as it was before its searches were counted (review): every place of
    every form, sorted, those that overlap or touch masked as one."""
    spans: list[tuple[int, int]] = []
    for form in forms:
        at = text.find(form)
        while at >= 0:
            spans.append((at, at + len(form)))
            at = text.find(form, at + 1)
    if not spans:
        return text
    spans.sort()
    kept: list[str] = []
    done = 0
    begin, end = spans[0]
    for at, stop in spans[1:]:
        if at <= end:
            end = max(end, stop)
        else:
            kept += text[done:begin], MASK
            done, begin, end = end, at, stop
    kept += text[done:begin], MASK, text[end:]
    return "".join(kept)


def forms_cases(rng: random.Random) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Texts and forms: a secret masked by its forms (a backslash, or more than
    `MOST_ESCAPABLE` characters to escape) amid pieces of its forms, whole and cut, and
    floods of them; and forms of a two-letter alphabet, whose places overlap and touch
    almost everywhere (periodic: `abab` in `ababab...`)."""
    for _ in range(150):
        length = rng.choice([1, 2, 5, 13, 14, 20, 40])
        secret = "".join(rng.choices("aZ9\\" + OTHERS, k=length))
        if not secret_forms.by_forms(secret):
            secret += "\\"
        forms = secret_forms.forms(secret)
        pieces = [form[: rng.randrange(1, len(form) + 1)] for form in forms] + list(forms)
        yield "".join(rng.choices([*pieces, "x", " ", "\\", "&"], k=rng.randrange(1, 60))), forms
        yield rng.choice(forms) * rng.randrange(1, 30) + rng.choice(["", "x", "\\"]), forms
    for _ in range(300):
        forms = tuple({"".join(rng.choices("ab", k=rng.randrange(1, 6))) for _ in range(3)})
        yield "".join(rng.choices("ab", k=rng.randrange(0, 300))), forms


def test_a_forms_search_masks_what_it_masked_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forms' places, searched a window of places at a time and merged as found, mask
    just what every place of every form sorted and merged did, at every window."""
    monkeypatch.setattr(masking, "MASKING_CPU", float("inf"))
    rng, cases = random.Random(20240612), 0
    for text, forms in forms_cases(rng):
        expected = reference_mask_forms(text, forms)
        for window in (1, 2, 3, 7, 64, 4096):
            monkeypatch.setattr(masking, "WINDOW", window)
            assert masking._mask_forms(text, forms, Budget()) == expected, (text, forms, window)
            cases += 1
    assert cases > 3000, cases


# ---- a pattern's compiling, non-ASCII secrets ------------------------------------------


def test_a_patterns_compiling_is_counted_before_its_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling a secret's pattern (~2.5 ms for 4,096 characters) came after the look at
    the budget, and a text of one window (4,096 characters) was then masked with no other
    look: whatever the compiling took (review). The clock here goes 6 ms on at each
    compiling, past the budget: both a short text and a long one are withheld."""
    compiling_costs(monkeypatch, 0.006)
    secret = "a&" * 6 + "Zq8Zq8Zq8Zq8"
    for text in ("x" * 10 + html.escape(secret), "x" * 5000 + html.escape(secret)):
        assert mask_secrets(text, [secret]) == WITHHELD


def test_a_secret_of_many_non_ascii_letters_is_masked_by_its_forms(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`_pattern` escapes every non-ASCII character (`é` as `&#233;`), but they were
    counted as letters, not as characters to escape: a secret of 1,024 `é` (a token an
    older version stored) went to the pattern, and an answer of its almost-matches took
    47 ms (review). It is masked by its forms, as one of many ASCII characters to escape."""

    def no_pattern(secret: str) -> Any:
        raise AssertionError(f"a pattern of {len(secret)} characters")

    secret = "é" * 1024
    flood = ("&#233;" * 1023 + "x") * 4
    monkeypatch.setattr(masking, "_pattern", no_pattern)
    assert mask_secrets(flood, [secret]) == flood
    assert mask_secrets("x" + json.dumps(secret) + "y", [secret]) == f'x"{MASK}"y'
    assert secret_forms.by_forms("é" * 13) and not secret_forms.by_forms("é" * 12)


@pytest.mark.parametrize(
    ("secret", "widest"),
    [("€" * 12, "&#x0020ac;" * 12), ("😀" * 13, json.dumps("😀" * 13)[1:-1])],
    ids=["pattern-euro", "forms-emoji"],
)
def test_the_read_past_the_cut_reaches_a_secrets_widest_form(secret: str, widest: str) -> None:
    """The read went past the cut 8 characters a character of the longest secret, but a
    form is wider past U+1000 (`&#x0020ac;`: 10) and JSON writes one past U+FFFF as two
    `\\u` escapes (12): a secret across the cut in such a form was not masked, and what
    the cut kept of it stayed (review). `past_cut` is the widest form of any secret."""
    assert masking.past_cut([secret, "short"]) >= len(widest)
    for cut in range(1, len(widest)):
        body = ("x" * 100 + widest + "y" * 300).encode()
        limit = 100 + cut
        kept = mask_cut(body[: limit + masking.past_cut([secret])], limit, [secret])
        assert kept == "x" * 100 + MASK, (cut, kept)


def test_a_plain_search_of_a_long_text_looks_at_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Secrets of 99 letters made to almost match everywhere in 20 KB: CPython's search of
    such a needle costs up to the text's length times its own, and four of them took
    10.7 ms (21 ms past the read limit) of `in` and `replace`, none of them looked at and
    nothing withheld (review). Past the budget, a text longer than a window is withheld
    before its next search, whether a secret was found in it yet or not."""
    secrets = ["a" * 96 + c + "aa" for c in "bcd"]
    text = "a" * 19_000 + " " + " ".join(secrets)
    monkeypatch.setattr(masking, "MASKING_CPU", float("inf"))
    assert mask_secrets(text, secrets) == "a" * 19_000 + " " + " ".join([MASK] * 3)
    monkeypatch.setattr(masking, "MASKING_CPU", 0.0)
    assert mask_secrets(text, secrets) == WITHHELD
    assert mask_secrets("a" * 20_000, secrets) == WITHHELD  # none there: searched all the same
