"""A callback's JMESPath filter, evaluated on an event within a budget.

A filter is short (`MAX_FILTER_LENGTH`), but what it makes need not be: each stage of
`join('', [@, @])` doubles a string, a chain of `[@, @]` stands for a tree of 2^n leaves
that `to_string` or `==` would walk, a few joins and `to_number` make an integer of 4,300
digits, and a filter projection walks a big event once per mention. Unbounded, one event
could fill a worker's memory or hold its event loop for minutes. So the filters of one
owner's callbacks (a project's; the platform-wide ones') share a `FilterBudget` per event
(per chunk of a fan-out, `DISPATCHER_FAN_OUT_CHUNK` callbacks):

- steps: the nodes of the expressions visited (a filter projection visits a few per
  element);
- units: what they make, each value as it is made (a list or an object: its length; a
  string: its length, 12 per character when not ASCII, as `to_string` may escape it; a
  number: its digits);
- before a call that walks, compares or copies its arguments (`to_string`, its strings
  counted as it may escape them, `contains`, `join`, `sort`, `max`, `min` and their `_by`
  forms, `sum`, `avg`, `to_number`, `starts_with`, `ends_with`), a walk of them: a step
  per value reached and its size in units, a part reached twice counted twice, the walk
  itself stopping once either runs out; `==` and `!=`, done here a pair at a time as
  Python does them, a step a pair; `<` of two strings, up to the shorter; `merge`, 50
  units a key it copies; a flatten, a step per element it goes through.

Past either, the filter fails as any filter that raises does, and so do that owner's next
ones on the event; other owners' budgets are whole (`dispatcher.worker.filtering`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jmespath
from jmespath.functions import Functions
from jmespath.visitor import Options, TreeInterpreter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from jmespath.parser import ParsedResult

__all__ = ["FILTER_STEPS", "FILTER_UNITS", "FilterBudget", "FilterFailed", "compile_filter",
           "filter_matches"]  # fmt: skip

FILTER_UNITS = 4_000_000  # about 4 MB of text, 32 MB of list items (a pointer each)
FILTER_STEPS = 100_000  # about 60 ms of a worker's event loop
_FUNCTIONS = Functions()  # one instance for every evaluation
_OPTIONS = Options(custom_functions=_FUNCTIONS)
_CONTAINERS, _NUMBERS, _READ_WHOLE = (list, dict), (int, float), (str, list, dict)  # tuples:
# faster than `list | dict` to test against, which is built anew each time it is evaluated
_MISSING = object()  # `equal`'s mark for a dict key the other dict lacks
_SPENT = "the filters of this callback's owner spent their budget on this event (over {what})"
# what makes a new value, charged its size as it is made
_MAKES = frozenset(
    ("function_expression", "multi_select_list", "multi_select_dict", "projection",
     "value_projection", "filter_projection", "flatten", "slice")
)  # fmt: skip
# charged a walk of their arguments first (they read them whole, or compare strings)
_WALKS = frozenset(
    ("to_string", "contains", "join", "sort", "max", "min", "sort_by", "max_by", "min_by",
     "starts_with", "ends_with", "sum", "avg", "to_number")
)  # fmt: skip


class FilterFailed(Exception):
    """A filter that raised on an event: the event is not delivered to that callback."""


@functools.lru_cache(maxsize=4096)
def compile_filter(expression: str) -> ParsedResult:
    """The compiled expression (compiled once per process)."""
    return jmespath.compile(expression)


@dataclass(slots=True)
class FilterBudget:
    """What the filters of one owner's callbacks may still spend on one event together."""

    steps: int = FILTER_STEPS
    units: int = FILTER_UNITS


def _size(value: object) -> int:
    """A value's own size, what making it cost (not what it points to)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else 12 * len(value)
    return _other_size(value)


def _printed(value: object) -> int:
    """`_size`, a string counted as `to_string` may print it: 6 per character when it holds
    a control character (`\\u0001`), 2 when only quotes and backslashes are escaped."""
    if isinstance(value, str):
        if not value.isascii():
            return 12 * len(value)
        return 2 * len(value) if value.isprintable() else 6 * len(value)
    return _other_size(value)


def _other_size(value: object) -> int:
    if isinstance(value, _CONTAINERS):
        return len(value) + 1
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() * 3 // 10 + 2  # its decimal digits, and a sign
    return 24 if isinstance(value, float) else 1


def _spent(*, steps: bool) -> FilterFailed:
    """The failure of a filter that spent what was left of its budget."""
    what = f"{FILTER_STEPS:,} steps" if steps else f"{FILTER_UNITS:,} units"
    return FilterFailed(_SPENT.format(what=what))


def _number(value: object) -> bool:
    """A number, as JMESPath has them (not a boolean)."""
    return isinstance(value, _NUMBERS) and not isinstance(value, bool)


def _number_and_bool(left: object, right: object) -> bool:
    """JMESPath's special case of `==`: 0 or 1 against a boolean is never equal."""
    for number, other in ((left, right), (right, left)):
        if _number(number) and number in (0, 1):
            return isinstance(other, bool)
    return False


def _ordered(value: object) -> bool:
    """Whether `<` and the rest may compare `value` (a number or a string)."""
    return isinstance(value, str) or _number(value)


class _Budgeted(TreeInterpreter):
    """JMESPath's interpreter, spending a `FilterBudget` (see the module's doc)."""

    def __init__(self, budget: FilterBudget) -> None:
        super().__init__(_OPTIONS)
        self.steps, self.units = budget.steps, budget.units
        self._methods: dict[str, Callable[..., Any]] = {}

    def spend(self, units: int) -> None:
        self.units -= units
        if self.units < 0:
            raise _spent(steps=False)

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _spent(steps=True)

    def visit(self, node: Any, *args: Any, **kwargs: Any) -> Any:
        kind = node["type"]
        method = self._methods.get(kind)
        if method is None:  # Visitor.visit's lookup, inlined: this runs for every node
            method = self._methods[kind] = getattr(self, f"visit_{kind}", self.default_visit)
        self.step()
        result = method(node, *args, **kwargs)
        if kind in _MAKES:
            self.spend(_size(result))
        return result

    def visit_function_expression(self, node: Any, value: Any) -> Any:
        args = [self.visit(child, value) for child in node["children"]]
        name = node["value"]
        if name in _WALKS:
            for arg in args:
                self.walk(arg, _printed if name == "to_string" else _size)
        if name == "join" and len(args) == 2 and isinstance(args[1], list):
            self.spend(_size(args[0]) * len(args[1]))  # the separators
        elif name == "merge":  # a copy of every argument's keys, about 50 bytes each
            self.spend(50 * sum(_size(arg) for arg in args))
        return _FUNCTIONS.call_function(name, args)

    def visit_comparator(self, node: Any, value: Any) -> Any:
        children = node["children"]
        left, right = self.visit(children[0], value), self.visit(children[1], value)
        op = node["value"]
        if op in ("eq", "ne"):  # JMESPath's: 0 and 1 are not false and true
            same = not _number_and_bool(left, right) and self.equal(left, right)
            return same if op == "eq" else not same
        if not (_ordered(left) and _ordered(right)):
            return None  # as JMESPath's interpreter: `<` and the rest, numbers and strings
        if isinstance(left, str) and isinstance(right, str):  # read up to the shorter
            self.spend(min(len(left), len(right)))
        return self.COMPARATOR_FUNC[op](left, right)

    def visit_flatten(self, node: Any, value: Any) -> Any:
        """JMESPath's flatten, a step per element it goes through (it made nothing of
        empty lists, and charged nothing for going through them)."""
        base = self.visit(node["children"][0], value)
        if not isinstance(base, list):
            return None
        self.steps -= len(base)
        self.step()
        merged: list[Any] = []
        for element in base:
            if isinstance(element, list):
                merged.extend(element)
            else:
                merged.append(element)
        return merged

    def equal(self, left: object, right: object) -> bool:
        """Python's `==` of the two, done here a pair at a time as Python does it: lengths
        first, a list's items and a dict's keys in order, an item the same object as its
        pair equal (not the two values themselves: `NaN` is not equal to itself), stopping
        at the first difference. Each pair costs a step as it is compared, each string (a
        key too) its length: what it costs is what it reads, whichever side comes first."""
        stack: list[Iterator[Any]] = [iter(((left, right),))]
        top = True
        while stack:
            pair = next(stack[-1], None)
            if pair is None:
                stack.pop()
                continue
            self.step()
            if pair is _MISSING:  # a key of one dict the other lacks
                return False
            a, b = pair
            if a is b and not top:
                continue
            top = False
            if isinstance(a, list) and isinstance(b, list):
                if len(a) != len(b):
                    return False
                stack.append(zip(a, b, strict=True))
            elif isinstance(a, dict) and isinstance(b, dict):
                if len(a) != len(b):
                    return False
                stack.append(self._dict_pairs(a, b))
            else:
                if isinstance(a, str) and isinstance(b, str) and len(a) == len(b):
                    self.spend(len(a))
                if a != b:
                    return False
        return True

    def _dict_pairs(self, a: dict[str, Any], b: dict[str, Any]) -> Iterator[Any]:
        """The value pairs of two dicts, key by key in `a`'s order, each key charged its
        length (it is compared to find its pair); `_MISSING` for one `b` lacks."""
        for key in a:
            self.spend(len(key))
            yield (a[key], b[key]) if key in b else _MISSING

    def walk(self, value: object, size: Callable[[object], int] = _size) -> None:
        """Charge what reading `value` whole reaches: a step and its size per value (this
        runs for every value reached: the charges are inlined, and the stack never holds
        more values than the steps left could reach)."""
        steps, units, stack = self.steps, self.units, [value]
        try:
            while stack:
                item = stack.pop()
                steps -= 1
                if isinstance(item, _CONTAINERS):
                    if len(item) > steps:  # more than the steps left can reach: over
                        steps = -1
                    elif isinstance(item, list):
                        units -= len(item) + 1
                        stack.extend(item)
                    else:
                        units -= len(item) + 1 + sum(size(key) for key in item)
                        stack.extend(item.values())
                else:
                    units -= size(item)
                if steps < 0 or units < 0:
                    raise _spent(steps=steps < 0)
        finally:
            self.steps, self.units = steps, units


def filter_matches(
    expression: str, envelope: Mapping[str, Any], budget: FilterBudget | None = None
) -> bool:
    """Whether `expression` is truthy on `envelope`; FilterFailed when it raises (a
    function given the wrong type, an ordering of a string and a number, ...) or spends
    more than is left of `budget` (a whole one when None; what it spends is taken off)."""
    budget = FilterBudget() if budget is None else budget
    interpreter = _Budgeted(budget)
    try:
        result = interpreter.visit(compile_filter(expression).parsed, envelope)
    except FilterFailed:
        raise
    except Exception as exc:  # any error of the expression on this event: it fails alone
        raise FilterFailed(f"{type(exc).__name__}: {exc}"[:500]) from exc
    finally:
        budget.steps, budget.units = max(interpreter.steps, 0), max(interpreter.units, 0)
    if result is None or result is False:
        return False
    return not (isinstance(result, _READ_WHOLE) and not result)
