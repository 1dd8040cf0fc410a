"""`Script`: a Lua script's keys and arguments named once, as dataclass fields, read in Lua
by those names."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dispatcher.lua import ArgList, Key, KeyList, Script


@dataclass(frozen=True)
class Swap(Script):
    """Sets `target` to `value` unless `guard` is set; returns the old value."""

    LUA = """
    if redis.call('EXISTS', guard) == 1 then return false end
    return redis.call('SET', target, value, 'GET', 'PX', ttl_ms)
    """
    target: Key
    value: str
    guard: Key
    ttl_ms: int


def test_keys_and_arguments_keep_their_order_and_become_lua_locals() -> None:
    assert (Swap._keys, Swap._args) == (("target", "guard"), ("value", "ttl_ms"))
    assert Swap._lua.source.splitlines()[:5] == [
        "local target = KEYS[1]",
        "local guard = KEYS[2]",
        "local value = ARGV[1]",
        "local ttl_ms = ARGV[2]",
        "if redis.call('EXISTS', guard) == 1 then return false end",
    ]


def test_a_call_sends_the_fields_as_keys_and_arguments() -> None:
    call = Swap(target="k:1", value="v", guard="k:lock", ttl_ms=500)
    assert call._call() == (["k:1", "k:lock"], ["v", 500])


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("end", "not a name Lua can read"),
        ("KEYS", "not a name Lua can read"),
        ("Bad", "not a name Lua can read"),
        ("run", "the name of a Script method"),
    ],
)
def test_a_field_lua_cannot_read_is_refused(name: str, why: str) -> None:
    with pytest.raises(TypeError, match=why):
        type("Broken", (Script,), {"LUA": "return 1", "__annotations__": {name: "Key"}})


@dataclass(frozen=True)
class Spread(Script):
    """Sets each of `targets` to the matching one of `values`, each for `ttl_ms`."""

    LUA = """
    for i, target in ipairs(targets) do redis.call('SET', target, values[i], 'PX', ttl_ms) end
    return #targets
    """
    marker: Key
    targets: KeyList
    ttl_ms: int
    values: ArgList


def test_a_list_field_is_the_rest_of_its_kind_read_as_a_lua_table() -> None:
    call = Spread(marker="m", targets=["k:1", "k:2"], ttl_ms=500, values=["a", "b"])
    assert call._call() == (["m", "k:1", "k:2"], [500, "a", "b"])
    lines = Spread._lua.source.splitlines()
    assert lines[1] == "local targets = {} for i = 2, #KEYS do targets[#targets + 1] = KEYS[i] end"
    assert lines[3] == "local values = {} for i = 2, #ARGV do values[#values + 1] = ARGV[i] end"


def test_a_list_that_is_not_the_last_of_its_kind_is_refused() -> None:
    annotations = {"first": KeyList, "second": Key}
    with pytest.raises(TypeError, match="a list must be the last of its kind"):
        type("Broken", (Script,), {"LUA": "return 1", "__annotations__": annotations})
