"""A callback's receiver controls: what reaches its receiver, and how fast.

`Options` is the named, typed set of what a registration may add to the seed's parameters
(`maxPerSecond`, `maxInFlight`, `filter`, `orderBy`): checked here once for every front
end, stored as fields of the callback's hash under their JSON names, read back with its row by the
fan-out's match script and `Registry.target`. A new option is a field here, its check, and
its name in `FIELDS`; the scripts take the names from Python.

The filter is a JMESPath expression (the `jmespath` library) over the envelope
`{"event", "projectId", "data"}`; the event goes to the callback when the result is truthy
by JMESPath's rules (`false`, `null`, `""`, `[]` and `{}` are false; `0` is true).

`orderBy` asks for ordered delivery (see `dispatcher.worker.lanes`): a dotted path into the
event's `data` (`buildId`, `build.id`) whose value names the event's lane, or `*` for one
lane per callback (and emitting project).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from jmespath import exceptions as jmespath_errors
from jmespath.functions import Functions

from dispatcher.errors import InvalidInput
from dispatcher.registry.filters import compile_filter
from dispatcher.registry.rules import checked_text

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "MAX_FILTER_LENGTH",
    "MAX_IN_FLIGHT",
    "MAX_ORDER_BY_LENGTH",
    "MAX_PER_SECOND",
    "NO_OPTIONS",
    "ORDER_ALL",
    "Options",
    "order_key",
]

MAX_PER_SECOND = 10_000  # each start is a member of a one-second sorted set in Redis
MAX_IN_FLIGHT = 1_000
MAX_FILTER_LENGTH = 1024
_FUNCTIONS = frozenset(Functions.FUNCTION_TABLE)
MAX_ORDER_BY_LENGTH = 128
ORDER_ALL = "*"  # one lane per callback (and emitting project)
# A dotted path of names: letters, digits, '_' and '-', not starting with a digit or '-'.
_ORDER_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*")


@dataclass(frozen=True, slots=True)
class Options:
    """What a callback may set beyond the seed's parameters; None is "not set"."""

    max_per_second: int | None = None
    max_in_flight: int | None = None
    filter: str | None = None
    order_by: str | None = None

    # The hash fields (and JSON names) of the options, in the order of the fields above.
    FIELDS: ClassVar[tuple[str, ...]] = ("maxPerSecond", "maxInFlight", "filter", "orderBy")

    @property
    def limited(self) -> bool:
        """Whether deliveries to the callback must be admitted (a limit is set)."""
        return self.max_per_second is not None or self.max_in_flight is not None

    def checked(self) -> Options:
        """The options once valid (the filter trimmed); InvalidInput naming the first that
        is not."""
        _check_limit(self.max_per_second, "maxPerSecond", MAX_PER_SECOND)
        _check_limit(self.max_in_flight, "maxInFlight", MAX_IN_FLIGHT)
        expression = None if self.filter is None else self.filter.strip() or None
        if expression is not None:
            check_filter(expression)
        if self.order_by is not None:
            check_order_by(self.order_by)
        return Options(self.max_per_second, self.max_in_flight, expression, self.order_by)

    def to_fields(self) -> list[str]:
        """Field, value pairs as the hash stores them ('' for an option not set)."""
        values = (self.max_per_second, self.max_in_flight, self.filter, self.order_by)
        pairs: list[str] = []
        for name, value in zip(self.FIELDS, values, strict=True):
            pairs += (name, "" if value is None else str(value))
        return pairs

    @classmethod
    def from_values(cls, values: Sequence[bytes | str | None]) -> Options:
        """The options from the hash's values of `FIELDS`, in that order (`NO_OPTIONS`, one
        object, when none is set: most callbacks, a new target each on a wide fan-out)."""
        if not any(values):
            return NO_OPTIONS
        texts = [v.decode() if isinstance(v, bytes) else (v or "") for v in values]
        per_second, in_flight, expression, order_by = texts
        return cls(
            int(per_second) if per_second else None,
            int(in_flight) if in_flight else None,
            expression or None,
            order_by or None,
        )

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> Options:
        """The options of a callback's hash read whole."""
        return cls.from_values([row.get(name) for name in cls.FIELDS])


NO_OPTIONS = Options()


def _check_limit(value: int | None, name: str, most: int) -> None:
    if value is not None and not 1 <= value <= most:
        raise InvalidInput(f"{name} must be an integer from 1 to {most}", param=name)


def check_order_by(path: str) -> None:
    """InvalidInput naming `orderBy` unless it is `*` or a dotted path of names."""
    if not path:
        raise InvalidInput(
            "orderBy is empty: give a dotted path into the event's data (buildId, build.id) "
            "or * for one lane per callback",
            param="orderBy",
        )
    if len(path) > MAX_ORDER_BY_LENGTH:
        raise InvalidInput(
            f"orderBy is longer than {MAX_ORDER_BY_LENGTH} characters", param="orderBy"
        )
    if path != ORDER_ALL and not _ORDER_PATH.fullmatch(path):
        raise InvalidInput(
            f"orderBy must be * or a dotted path of names into the event's data (buildId, "
            f"build.id), not {path!r}",
            param="orderBy",
        )


_MISSING = object()


def order_key(path: str, data: Mapping[str, Any]) -> str | None:
    """The lane an event with `data` takes under `orderBy` `path`: '' for `*`, the value at
    the path as text (a string as it is, a boolean as JSON writes it, a number as `repr`
    does: `1e+16` where JSON writes `1e16`), or None
    when the event has no such value (a missing field, null, an object or a list)."""
    if path == ORDER_ALL:
        return ""
    value: Any = data
    for name in path.split("."):
        value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return None


def check_filter(expression: str) -> None:
    """InvalidInput naming `filter`, with the parser's message, unless it compiles and
    calls only JMESPath's own functions, and holds no control characters (`checked_text`)."""
    if len(expression) > MAX_FILTER_LENGTH:
        raise InvalidInput(f"filter is longer than {MAX_FILTER_LENGTH} characters", param="filter")
    checked_text(expression, "filter")
    try:
        compiled = compile_filter(expression)
    except jmespath_errors.JMESPathError as exc:
        raise InvalidInput(f"filter is not a JMESPath expression: {exc}", param="filter") from None
    except RecursionError:  # `((((...a))))`, `!!!!...a`: nested past the parser's reach
        raise InvalidInput("filter is nested too deeply", param="filter") from None
    unknown = sorted(_functions(compiled.parsed) - _FUNCTIONS)
    if unknown:
        raise InvalidInput(
            f"filter calls unknown function(s) {', '.join(f'{n}()' for n in unknown)}; "
            "JMESPath's are: " + ", ".join(sorted(_FUNCTIONS)),
            param="filter",
        )


def _functions(node: Mapping[str, Any]) -> set[str]:
    """Names of the functions an expression's syntax tree calls."""
    found = {node["value"]} if node.get("type") == "function_expression" else set()
    for child in node.get("children", ()):
        if isinstance(child, dict):
            found |= _functions(child)
    return found
