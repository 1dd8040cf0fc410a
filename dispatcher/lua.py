"""Lua scripts without redis-py's per-pipeline `SCRIPT EXISTS` round trip, and `Script`:
a script as a typed Python call that names its keys and arguments once.

redis-py checks every script of a pipeline with an extra round trip each time the pipeline
runs. Here a script is sent by its SHA; when Redis answers NOSCRIPT (it restarted, or never
saw the script) every script is loaded and the call is made again.

A `Script` is a dataclass whose fields are the script's keys (annotated `Key`) and
arguments, in order; its Lua reads them by those names (local variables set from KEYS and
ARGV), and a call is `await Claim(mark=..., index=...).run(redis)` or `.queue_on(pipe)`:

    @dataclass
    class Claim(Script):
        '''Marks a shard with its position; returns the position marked first.'''

        LUA = '''
        local marked = redis.call('GET', mark)
        if marked then return marked end
        redis.call('SET', mark, index)
        return index
        '''
        mark: Key
        index: int

Key names are made in Python (`dispatcher.keys`) and given as keys, never built in Lua.

A script class that sets `TOGETHER = True` may also run many of its calls as one
(`queue_together`): one `EVALSHA` instead of one per call, its answer the list of theirs,
each call's error in its place without stopping the others. Its `BEFORE` and `AFTER` run
once around the calls (a single call's too): what each call put off to do once for them
all, as `dispatcher.ending` ends their jobs in one `DEL` and one `ZREM`.
"""

from __future__ import annotations

import hashlib
import operator
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, get_type_hints

from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

__all__ = [
    "IN_SLICES",
    "KEEP_AT_LEAST",
    "REDIS_NOW_MS",
    "ArgList",
    "Key",
    "KeyList",
    "Lua",
    "Script",
    "run_pipeline",
]

Arg = str | bytes | int | float

# A Lua function a script prepends to its own: Redis's clock in ms (`TIME`, seconds and
# µs). Scripts that judge what is due or when a lease ends read it: the leases lapse by it,
# whatever the clocks of the workers say.
REDIS_NOW_MS = """
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# A Lua function a script prepends to its own: `redis.call` of the command `head` (a table:
# the command and its first arguments) with `items` after it, a slice of 1,000 at a time
# (Lua's `unpack` takes about 8,000 values at once); a slice keeps pairs together.
IN_SLICES = """
local function in_slices(head, items)
  for i = 1, #items, 1000 do
    local call = {unpack(head)}
    for j = i, math.min(i + 999, #items) do call[#call + 1] = items[j] end
    redis.call(unpack(call))
  end
end
"""

# A Lua function a script prepends to its own: `key` kept at least `ms` from now, its time
# to live raised when shorter, never cut (a key kept once for many others that each need it
# so long: `dispatcher.bodies`, `dispatcher.history.kept`); a key kept for ever (no time to
# live: a body an ordered delivery's parked job refers to) stays so.
KEEP_AT_LEAST = """
local function keep_at_least(key, ms)
  local left = redis.call('PTTL', key)
  if left ~= -1 and left < ms then redis.call('PEXPIRE', key, ms) end
end
"""


class Lua:
    """One script, by its source. Instances are module constants."""

    scripts: ClassVar[list[Lua]] = []

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        Lua.scripts.append(self)

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run now (one round trip; two after a Redis restart)."""
        try:
            return await redis.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self.sha, len(keys), *keys, *args
            )
        except NoScriptError:
            await load_all(redis)
            return await redis.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self.sha, len(keys), *keys, *args
            )

    def queue_on(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Queue on `pipe`; run it with `run_pipeline` (or a Batcher), which handles NOSCRIPT."""
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)


async def load_all(redis: Redis) -> None:
    for script in Lua.scripts:
        await redis.script_load(script.source)


def first_error(results: Sequence[Any]) -> Exception | None:
    return next((r for r in results if isinstance(r, Exception)), None)


async def run_pipeline(redis: Redis, queue: Callable[[Pipeline], None]) -> list[Any]:
    """Run the commands `queue` puts on a pipeline, in one round trip. The commands must be
    safe to send again next to a script that answered NOSCRIPT (which did not run)."""
    for tries_left in (1, 0):
        async with redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        if tries_left and any(isinstance(r, NoScriptError) for r in results):
            await load_all(redis)
            continue
        if (error := first_error(results)) is not None:
            raise error
        return results
    raise AssertionError("unreachable")


class _KeyMark:
    """What marks a `Script` field as a key (KEYS), not an argument (ARGV)."""


class _ListMark:
    """What marks a `Script` field as a list: the last of its kind, any length, read in
    Lua as a table."""


Key = Annotated[str, _KeyMark]
KeyList = Annotated[Sequence[str], _KeyMark, _ListMark]
ArgList = Annotated[Sequence[Arg], _ListMark]

_LUA_WORDS = set(
    "and break do else elseif end false for function goto if in local nil not or repeat "
    "return then true until while redis KEYS ARGV".split()
)


class Script:
    """A Lua script as a dataclass: its fields are its keys (`Key`) and arguments in order,
    read in `LUA` by their names. Subclasses set `LUA` and are a plain `@dataclass`: one is
    made per call, on the hot path, where a frozen one's `__init__` costs ~0.15 µs a field
    (4 µs for the record's 24)."""

    LUA: ClassVar[str]
    TOGETHER: ClassVar[bool] = False  # whether `queue_together` may run calls as one
    BEFORE: ClassVar[str] = ""  # Lua run once before the body (every call's, together)
    AFTER: ClassVar[str] = ""  # and once after it, whatever the body returned
    _lua: ClassVar[Lua]
    _keys: ClassVar[tuple[str, ...]]
    _args: ClassVar[tuple[str, ...]]
    _lists: ClassVar[frozenset[str]]
    _readers: ClassVar[tuple[Callable[[Script], list[Any]], Callable[[Script], list[Any]]]]
    _together: ClassVar[Lua]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        hints = get_type_hints(cls, include_extras=True)
        names = [name for name in cls.__annotations__ if not name.startswith("_")]
        names = [name for name in names if name in hints and name != "LUA"]
        for name in names:
            if name in _LUA_WORDS or not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
                raise TypeError(f"{cls.__name__}.{name}: not a name Lua can read")
            if hasattr(Script, name):
                raise TypeError(f"{cls.__name__}.{name}: the name of a Script method")
        marks = {n: getattr(hints[n], "__metadata__", ()) for n in names}
        cls._keys = tuple(n for n in names if _KeyMark in marks[n])
        cls._args = tuple(n for n in names if n not in cls._keys)
        cls._lists = frozenset(n for n in names if _ListMark in marks[n])
        cls._readers = (cls._reader(cls._keys), cls._reader(cls._args))
        setup = [*_locals(cls, cls._keys, "KEYS"), *_locals(cls, cls._args, "ARGV")]
        cls._lua = Lua(_alone(cls, setup))
        if cls.TOGETHER:
            cls._together = Lua(_together(cls))

    def _call(self) -> tuple[list[Any], list[Any]]:
        keys, args = self._readers
        return keys(self), args(self)

    @classmethod
    def _reader(cls, names: tuple[str, ...]) -> Callable[[Script], list[Any]]:
        """What reads the values of `names` off an instance, in order, a list field (the
        last of its kind) spread: one `operator.attrgetter` call for them all."""
        if not names:
            return lambda _: []
        get = operator.attrgetter(*names)
        one, spread = len(names) == 1, names[-1] in cls._lists

        def read(script: Script) -> list[Any]:
            values = (get(script),) if one else get(script)
            return [*values[:-1], *values[-1]] if spread else list(values)

        return read

    async def run(self, redis: Redis) -> Any:
        """Run now (one round trip; two after a Redis restart)."""
        return await self._lua(redis, *self._call())

    def queue_on(self, pipe: Pipeline) -> None:
        """Queue on `pipe`; run it with `run_pipeline` (or a Batcher)."""
        self._lua.queue_on(pipe, *self._call())

    @classmethod
    def queue_together(cls, pipe: Pipeline, calls: Sequence[Script]) -> None:
        """Queue `calls` (of this class, `TOGETHER`) on `pipe` as one script call, run in
        order in one go (so keep them few: Redis serves no one else meanwhile). Its answer
        is the list of theirs: a call that fails leaves its error in its place (what it
        wrote before failing stays, as with a script of its own, and so does what it put
        off to `AFTER`) and the next one runs."""
        if not cls.TOGETHER:
            raise TypeError(f"{cls.__name__} does not run together (TOGETHER is not set)")
        keys: list[Any] = []
        args: list[Any] = []
        for call in calls:
            if type(call) is not cls:
                raise TypeError(f"{cls.__name__}.queue_together: given a {type(call).__name__}")
            mine, theirs = call._call()
            keys += mine
            if cls._lists:  # its lists' lengths vary: its slices' sizes lead its arguments
                args += (len(mine), len(theirs))
            args += theirs
        cls._together.queue_on(pipe, keys, args)


def _locals(cls: type[Script], names: tuple[str, ...], table: str) -> list[str]:
    """The Lua lines that read `names` from KEYS or ARGV: one value each, and the list (the
    last, if any) as a table of the rest."""
    lines = []
    for i, name in enumerate(names, 1):
        if name not in cls._lists:
            lines.append(f"local {name} = {table}[{i}]")
        elif i == len(names):
            rest = f"for i = {i}, #{table} do {name}[#{name} + 1] = {table}[i] end"
            lines.append(f"local {name} = {{}} {rest}")
        else:
            raise TypeError(f"{cls.__name__}.{name}: a list must be the last of its kind")
    return lines


def _alone(cls: type[Script], setup: list[str]) -> str:
    """The Lua of one call: the body after its `setup` (the names read from KEYS and
    ARGV); with an `AFTER`, the body is a function whose answer (or error) is returned
    after it: what a call put off lands though it failed after, as run together."""
    body = textwrap.dedent(cls.LUA).strip()
    if not cls.AFTER:
        return "\n".join([*_once(cls.BEFORE), *setup, body, ""])
    return "\n".join([
        *_once(cls.BEFORE), *setup, "local function one()", body, "end",
        "local ok, answer = pcall(one)", *_once(cls.AFTER),
        "if not ok and type(answer) ~= 'table' then answer = {err = tostring(answer)} end",
        "return answer", "",
    ])  # fmt: skip


def _once(lua: str) -> list[str]:
    return [textwrap.dedent(lua).strip()] if lua.strip() else []


def _together(cls: type[Script]) -> str:
    """The Lua of `cls.queue_together`: the script's body as a function of its keys and
    arguments, called (protected) on each call's slice of KEYS and ARGV in turn. A script
    with list fields gets each slice's sizes ahead of its arguments."""
    per_key, per_arg = len(cls._keys), len(cls._args)
    if not per_key or not per_arg:
        raise TypeError(f"{cls.__name__}: a script runs together only with keys and arguments")
    if cls._lists:
        head = [
            "local at_key, at_arg = 0, 0",
            "while at_arg < #ARGV do",
            "  local key_count, arg_count = tonumber(ARGV[at_arg + 1]), tonumber(ARGV[at_arg + 2])",
            "  at_arg = at_arg + 2",
        ]
        tail = ["  at_key, at_arg = at_key + key_count, at_arg + arg_count"]
    else:
        head = [
            f"for n = 0, #KEYS / {per_key} - 1 do",
            f"  local at_key, at_arg = n * {per_key}, n * {per_arg}",
        ]
        tail = []
    values = [*_slice(cls, cls._keys, "KEYS", "at_key", "key_count", head)]
    values += _slice(cls, cls._args, "ARGV", "at_arg", "arg_count", head)
    body = textwrap.dedent(cls.LUA).strip()
    return "\n".join([
        *_once(cls.BEFORE),
        f"local function one({', '.join((*cls._keys, *cls._args))})",
        body,
        "end",
        "local out = {}",
        *head,
        f"  local ok, answer = pcall(one, {', '.join(values)})",
        "  if not ok and type(answer) ~= 'table' then answer = {err = tostring(answer)} end",
        "  if answer == nil then answer = false end",
        "  out[#out + 1] = answer",
        *tail,
        "end",
        *_once(cls.AFTER),
        "return out",
        "",
    ])  # fmt: skip


def _slice(
    cls: type[Script], names: tuple[str, ...], table: str, at: str, count: str, lines: list[str]
) -> list[str]:
    """The values of one call's `names` in `table` from `at` on (a list field, the last:
    the rest of its `count`, gathered by a line added to `lines`)."""
    values = [f"{table}[{at} + {i}]" for i, name in enumerate(names, 1) if name not in cls._lists]
    if names and names[-1] in cls._lists:
        rest, first = f"{table.lower()}_rest", len(values) + 1
        lines.append(f"  local {rest} = {{}}")
        lines.append(
            f"  for i = {at} + {first}, {at} + {count} do {rest}[#{rest} + 1] = {table}[i] end"
        )
        values.append(rest)
    return values
