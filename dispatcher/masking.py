"""What history keeps of a receiver's answer and an error: the secrets an attempt sent
masked, as sent and as JSON, HTML and URL encoders escape them, within a budget of the loop's
time (`MASKING_CPU`). Nothing here sends anything (`delivery.py` does) or chooses the
secrets (`headers.sent_secrets` does)."""

from __future__ import annotations

import codecs
import functools
import heapq
import re
import time
from typing import TYPE_CHECKING

from dispatcher.models import MASK
from dispatcher.secret_forms import ESCAPABLE, by_forms, forms

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "MASKING_CPU",
    "WITHHELD",
    "Budget",
    "mask_cut",
    "mask_secrets",
    "past_cut",
]

SHORT_SECRET = 8  # shorter secrets are masked only where they stand alone
# The CPU time of the worker's loop an attempt's masking may take (its answer's head and
# whole, its error), looked at before each secret's scan and after its pattern is compiled,
# every `WINDOW` characters of a pattern's scan and every `SEARCHED` characters a forms
# search looks at. A project chooses its secrets and its receiver the text, which can be
# made to match almost everywhere: 20 KB took ~5 ms a secret, 14-25 ms an attempt, 27-50
# ms past the read limit, every other project's deliveries waiting (review). Past it the
# text is withheld whole (`WITHHELD`): what is left unmasked might hold a secret. Such an
# attempt now takes 5.0-5.5 ms: the budget and the step that passes it (a window's scan, up
# to ~0.6 ms; a forms search, ~0.15 ms; a 4,096-character secret's forms made, 0.6-1.2 ms
# with their URL forms, 3-6 ms in a first version of those: review; a plain search of a
# text past a window, up to ~2 ms: `_searched`).
# One step is not cut: compiling a secret's pattern, 2.1-2.8 ms for 4,096 characters (new
# for each secret a project chooses), started with the budget all but spent: 7.65 ms at
# worst measured. A normal answer takes about what it did (2 KB echoing the secrets, ~20 us;
# 20 KB with a random 64-character token, masked by its forms, ~0.5 ms): the clock (a
# system call, 1-2 us) is read at the start and end, and before a scan or a search of a
# long text; not at all when no secret fits in the text.
MASKING_CPU = 0.005
WITHHELD = f"[withheld: masking the secrets it may hold took over {MASKING_CPU * 1000:g} ms of CPU]"
WINDOW = 4096  # characters
SEARCHED = 16_384  # characters a forms search looks at between two looks at the clock


class _Spent(Exception):
    """An attempt's masking has taken its budget."""


class Budget:
    """The CPU time an attempt's masking may still take, spent by each text it masks:
    this thread's (`time.thread_time`, a system call: 1-2 us a look), so time the
    worker's process is not running, or runs other threads, is not counted. A garbage
    collection that an allocation inside masking starts is counted (a full one of a large
    heap can take tens of ms): a normal answer may then, rarely, be withheld, its body
    lost and no secret kept."""

    __slots__ = ("_left", "_since", "_work")

    def __init__(self) -> None:
        self._left = MASKING_CPU
        self._since = 0.0
        self._work = 0

    def start(self) -> None:
        self._since = time.thread_time()

    def stop(self) -> None:
        self._left -= time.thread_time() - self._since

    def check(self) -> None:
        """Raise `_Spent` once the time since `start` is all that was left."""
        if time.thread_time() - self._since >= self._left:
            raise _Spent

    def searched(self, characters: int) -> None:
        """Count the characters a search looked at, and `check` once per `SEARCHED` of them."""
        self._work += characters
        if self._work >= SEARCHED:
            self._work = 0
            self.check()


def mask_secrets(text: str, secrets: Sequence[str], budget: Budget | None = None) -> str:
    """`text` (what a receiver answered, an error) with each of `secrets` masked, as sent
    and as encoders escape it (`_pattern`), the longest first (a secret may hold another:
    the previous token the new one). When none is there, one `in` per secret no longer
    than `text`: of a run of its letters and digits, which every form keeps (`_anchor`);
    one that holds the secret before it (`sent_secrets`) is there only if that one is.
    One shorter than `SHORT_SECRET` is masked only where no letter or digit touches it:
    inside words, masking would garble the text and give the secret away by its gaps.
    `WITHHELD` instead once masking has taken `budget` (the attempt's; a new one if none).
    When no secret fits in `text` (a receiver's `ok`), none is there: no clock is read."""
    if all(len(secret) > len(text) for secret in secrets):
        return text
    budget = Budget() if budget is None else budget
    budget.start()
    try:
        found = _there(text, secrets, budget)
        return _masked(text, found, budget) if found else text
    except _Spent:
        return WITHHELD
    finally:
        budget.stop()


def _there(text: str, secrets: Sequence[str], budget: Budget) -> list[str]:
    """Those of `secrets` whose `_anchor` is in `text`, a look at `budget` before each
    search of a text longer than a `WINDOW` (`_searched`)."""
    size, found, inner, there = len(text), [], "", False
    for secret in secrets:
        if len(secret) > size:
            continue
        if not (inner and inner in secret):
            _searched(size, budget)
            there = _anchor(secret) in text
        if there:
            found.append(secret)
        inner = secret
    return found


def _masked(text: str, found: list[str], budget: Budget) -> str:
    """`text` with each of `found` masked, a look at `budget` before each scan (a secret
    as sent is replaced without: one linear pass)."""
    for secret in sorted(found, key=len, reverse=True):
        if by_forms(secret):
            budget.check()
            text = _mask_forms(text, forms(secret), budget)  # as sent too: too many mixes
            continue
        _searched(len(text), budget)
        if _whole(secret) and secret in text:
            _searched(len(text), budget)
            text = text.replace(secret, MASK)
        _searched(len(text), budget)
        if _anchor(secret) in text:  # escaped, or short: the pattern
            budget.check()
            text = _scan(text, secret, budget)
    return text


def _searched(size: int, budget: Budget) -> None:
    """A look at `budget` before a plain search (`in`, `replace`) of a text of `size`
    past a `WINDOW`: CPython's search of a needle under 100 characters in a text under
    30,000 costs up to their product, and three secrets of 99 letters made to almost
    match everywhere in 20 KB took 10.7 ms of such searches (21 ms with the read past the
    cut), none of them looked at (review). One search is then the most past the budget
    (~2 ms at worst); a short text's costs no look."""
    if size > WINDOW:
        budget.check()


def _mask_forms(text: str, forms: Sequence[str], budget: Budget) -> str:
    """`text` with every place any of `forms` stands masked, places that overlap or touch
    as one: found in the text as it came, each form in one linear pass (`_places`), so no
    form's masking leaves part of another standing (one after another, PHP's `\\/abc\\\\`,
    found first where the secret `/abc\\` as sent ended, left it but its last character).
    The forms' places are merged in order, a look at `budget` every 1,024 of them."""
    runs = [_places(text, form, budget) for form in forms]
    kept: list[str] = []
    done, begin, end = 0, -1, -1  # the text kept so far ends at `done`; `begin:end` is masked
    for count, (at, stop) in enumerate(heapq.merge(*runs), 1):
        if not count % 1024:
            budget.check()
        if at <= end:  # overlaps or touches the place being masked
            end = max(end, stop)
            continue
        if end >= 0:
            kept += text[done:begin], MASK
            done = end
        begin, end = at, stop
    if end < 0:
        return text
    kept += text[done:begin], MASK, text[end:]
    return "".join(kept)


# What a search costs in the characters `Budget.searched` counts, besides those it looks at
# (the loop's own work: a flood of a one-character form is a search at each place).
SEARCH = 64


def _places(text: str, form: str, budget: Budget) -> list[tuple[int, int]]:
    """Where `form` stands in `text`, places that overlap or touch merged as found, in
    order: each search over the starts of at most `WINDOW` places, `budget` told what it
    looked at (the characters up to the place found, or, when none is, to the window's end
    and a form's width past it, and the form's own and `SEARCH`; counted to the window's
    end only, the searches of URL's `%2F` for 4,096 slashes, 12,288 characters, looked at
    55,903 characters between two looks). Each place found is a form checked whole, so
    counting places was not enough: 1,024 places of .NET's `\\u0022` for 4,096 quotes
    (24,576 characters each) took 19 ms between two looks at the budget (review). A window
    keeps each search short: one of a form under 100 characters over 30,000 that nearly
    match it everywhere (CPython then compares at each place) took ~1 ms, over a window's
    ~0.13 ms."""
    runs: list[tuple[int, int]] = []
    width, at, last = len(form), 0, len(text) - len(form)  # the last place it may start at
    begin, end = -1, -1  # the run of places being merged
    while at <= last:
        stop = min(at + WINDOW, last + 1)  # the places searched: `at` up to `stop`
        reach = stop + width - 1  # a search that finds nothing looks this far, not to `stop`
        found = text.find(form, at, reach)
        budget.searched((reach if found < 0 else found) - at + width + SEARCH)
        if found < 0:
            at = stop
        elif found <= end:
            end, at = found + width, found + 1
        else:
            if end >= 0:
                runs.append((begin, end))
            begin, end, at = found, found + width, found + 1
    if end >= 0:
        runs.append((begin, end))
    return runs


def _whole(secret: str) -> bool:
    """Whether `secret` as sent is a whole form wherever it stands, so that replacing it
    leaves nothing of an escape behind: long enough, and no escape of its first character
    ends with it (`\\/`), nor one of its last begins with it (`&amp;`, `\\\\`, `%25`)."""
    return len(secret) >= SHORT_SECRET and secret[0].isalnum() and secret[-1] not in "&\\%"


def mask_cut(body: bytes, limit: int, secrets: Sequence[str], budget: Budget | None = None) -> str:
    """The first `limit` bytes of `body` decoded (a character they cut left out), with
    `secrets` masked, and one across the cut too: `body` goes on past the cut as far as the
    widest form of the longest secret (`past_cut`), so a secret the cut falls inside is
    masked whole there, and what is kept ends with a mask where the two part. `WITHHELD`
    when masking either takes `budget` (the attempt's; a new one if none) past its time."""
    budget = Budget() if budget is None else budget
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    head = decoder.decode(body[:limit])
    past = body[limit : limit + past_cut(secrets)]  # a read may have brought much more
    whole = mask_secrets(head + decoder.decode(past, final=True), secrets, budget)
    head = mask_secrets(head, secrets, budget)
    if WITHHELD in (whole, head):
        return WITHHELD
    if whole.startswith(head):
        return head
    same, differs = 0, min(len(head), len(whole))  # their longest common start, by halves
    while same < differs:
        middle = (same + differs + 1) // 2
        same, differs = (middle, differs) if whole[:middle] == head[:middle] else (same, middle - 1)
    return head[:same] if head[:same].endswith(MASK) else head[:same] + MASK


def past_cut(secrets: Sequence[str]) -> int:
    """How far `mask_cut` wants to read past a cut: the widest form of any secret (`_reach`)."""
    return max(map(_reach, secrets), default=0)


def _scan(text: str, secret: str, budget: Budget) -> str:
    """`_pattern(secret).sub(MASK, text)`, with a look at `budget` before each `WINDOW`
    characters: a match is taken where it starts inside the window, the search going past
    the window's end as far as the widest form of the secret (`_reach`), so that a match
    starting inside and the character after it (a short secret's pattern looks at it) are
    in sight: one across the end is found whole, as `sub` finds it, and none else."""
    pattern = _pattern(secret)  # compiled: ~2.5 ms for 4,096 characters, a step not cut
    budget.check()  # else a text of one window was masked whatever the compiling took
    if len(text) <= WINDOW:
        return pattern.sub(MASK, text)
    kept: list[str] = []  # the text before `done`, masked
    reach, done, at = _reach(secret), 0, 0
    while at < len(text):
        budget.check()
        end = at + WINDOW
        while at < end and (match := pattern.search(text, at, end + reach)):
            if match.start() >= end:  # found again from the next window, if it is the first
                break
            kept += text[done : match.start()], MASK
            done = at = match.end()
        at = max(at, end)
    return "".join(kept) + text[done:]


@functools.lru_cache(maxsize=1024)
def _reach(secret: str) -> int:
    """How long a form of `secret` may be, a match of `_pattern` or one of `_forms`: its
    letters and digits and the widest form of each other character, at most 8 for ASCII
    (`&#x0026;`); else `&#x00`, the hex digits and `;` (`&#x0020ac;`: 10), `&#00`, the
    decimal ones and `;`, or JSON's pair of `\\u` escapes past U+FFFF (`\\ud83d\\ude00`).
    A fixed 8 a character was too short for those at U+1000 and above."""
    escapable = ESCAPABLE.findall(secret)
    if secret.isascii():
        return len(secret) + 7 * len(escapable)
    return len(secret) + sum(_width(c) - 1 for c in escapable)


def _width(c: str) -> int:
    """The widest form of `c`, a character other than an ASCII letter or digit."""
    code = ord(c)
    return max(6 + len(f"{code:x}"), 5 + len(str(code)), 12 if code > 0xFFFF else 0)


_LONG_RUN = re.compile(r"[A-Za-z0-9]{8,}")
_RUN = re.compile(r"[A-Za-z0-9]+")
# What a character other than a letter or digit may be written as, besides itself: after a
# backslash (JSON's `\/` and `\"`), as a `\u` escape in either case (Go's `\u0026`, .NET's
# `\u002B`), as an HTML character reference (`&quot;`, `&#39;`, `&#039;`, `&#x27;`), as the
# URL escapes of its UTF-8 bytes in either case (`%2F`, `%c3%a9`), a space as `+` too. At
# most `_width` characters each.
_NAMED = {'"': "|&quot;", "&": "|&amp;", "<": "|&lt;", ">": "|&gt;", "'": "|&apos;", "\t": r"|\\t"}


@functools.lru_cache(maxsize=4096)
def _anchor(secret: str) -> str:
    """A run of `secret`'s ASCII letters and digits, which no encoder escapes: the whole
    secret when it is nothing else, else its first run of 8 or more, else its longest."""
    if secret.isascii() and secret.isalnum():
        return secret
    if (run := _LONG_RUN.search(secret)) is not None:
        return run.group()
    return max(_RUN.findall(secret), key=len, default="")


def _escaped(c: str) -> str:
    """A pattern of `c`, a character other than a letter or digit, as any form it may take."""
    code, named = ord(c), _NAMED.get(c, "") + (r"|\+" if c == " " else "")
    literal = re.escape(c)
    url = "".join(f"%{byte:02x}" for byte in c.encode(errors="surrogatepass"))
    return (  # the escapes first: the last character's `&amp;` masked whole, not its `&`
        rf"(?:\\{literal}|(?i:\\u{code:04x}|&#x0{{0,2}}{code:x};|{url})|&#0{{0,2}}{code};"
        rf"{named}|{literal})"
    )


@functools.lru_cache(maxsize=256)
def _pattern(secret: str) -> re.Pattern[str]:
    """Every form of `secret`: its letters and digits as they are, each other character
    as `_escaped` says; standing alone when shorter than `SHORT_SECRET`."""
    forms = "".join(c if c.isascii() and c.isalnum() else _escaped(c) for c in secret)
    if len(secret) < SHORT_SECRET:
        forms = rf"(?<![A-Za-z0-9]){forms}(?![A-Za-z0-9])"
    return re.compile(forms)
