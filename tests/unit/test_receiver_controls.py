"""Receiver controls without servers: the options' checks, the filter's truthiness and
failures, the signature of a rotation's overlap, the event catalogue."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import random
import tracemalloc
from types import SimpleNamespace
from typing import Any

import jmespath
import pytest
from redis.asyncio import Redis
from standardwebhooks import Webhook, WebhookVerificationError

from dispatcher.catalogue import CATALOGUE
from dispatcher.ending import JobEnd
from dispatcher.errors import InvalidInput
from dispatcher.headers import request_headers
from dispatcher.keys import Keys
from dispatcher.models import PIPELINELESS_EVENTS, PLATFORM_PROJECT, Event, Level, Region
from dispatcher.registry import CallbackTarget, Options
from dispatcher.registry.filters import FilterBudget, FilterFailed, filter_matches
from dispatcher.registry.match import Shadow
from dispatcher.settings import Settings
from dispatcher.worker.controls import Controls, Release
from dispatcher.worker.fence import CONFIRM_WAIT_S
from dispatcher.worker.filtering import Filters
from dispatcher.worker.shares import Shares
from dispatcher.worker.steps import Step

ENVELOPE = {
    "event": "BUILD_END",
    "projectId": "demo",
    "data": {"status": "FAILED", "branch": "main", "n": 3, "tags": []},
}


@pytest.mark.parametrize(
    ("options", "param"),
    [
        (Options(max_per_second=0), "maxPerSecond"),
        (Options(max_per_second=10_001), "maxPerSecond"),
        (Options(max_in_flight=0), "maxInFlight"),
        (Options(max_in_flight=1001), "maxInFlight"),
        (Options(filter="data.status == "), "filter"),
        (Options(filter="x" * 1025), "filter"),
        (Options(filter="nope(data)"), "filter"),
    ],
)
def test_bad_options_name_their_parameter(options: Options, param: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        options.checked()
    assert refused.value.param == param and param in refused.value.message


def test_a_filter_that_does_not_compile_gets_the_parsers_message() -> None:
    with pytest.raises(InvalidInput) as refused:
        Options(filter="data.status == 'FAILED' &&").checked()
    assert "Incomplete expression" in refused.value.message  # jmespath's own words
    with pytest.raises(InvalidInput, match=r"unknown function\(s\) nope\(\)"):
        Options(filter="nope(data)").checked()


def test_options_round_trip_through_their_stored_fields() -> None:
    options = Options(5, 2, "  data.status == 'FAILED'  ").checked()
    assert options.filter == "data.status == 'FAILED'" and options.limited
    fields = options.to_fields()
    assert fields[::2] == list(Options.FIELDS)
    assert Options.from_values([v.encode() for v in fields[1::2]]) == options
    assert Options.from_values([b""] * len(Options.FIELDS)) == Options()
    assert not Options().limited
    assert Options(filter="   ").checked().filter is None


@pytest.mark.parametrize(
    ("expression", "matches"),
    [
        ("data.status == 'FAILED' && data.branch == 'main'", True),
        ("data.status == 'FAILED' && data.branch == 'dev'", False),
        ("projectId == 'demo' && event == 'BUILD_END'", True),
        ("data.n", True),  # 0 and 3 are true in JMESPath
        ("data.missing", False),  # null
        ("data.tags", False),  # []
        ("data.status == 'SUCCEED' || data.n > `2`", True),
    ],
)
def test_a_filter_is_truthy_by_jmespaths_rules(expression: str, matches: bool) -> None:
    assert filter_matches(expression, ENVELOPE) is matches


def test_zero_is_true_and_empty_things_are_false() -> None:
    assert filter_matches("data.zero", {"data": {"zero": 0}})
    empties: list[object] = ["", [], {}, False, None]
    for empty in empties:
        assert not filter_matches("data.x", {"data": {"x": empty}})


@pytest.mark.parametrize("expression", ["length(data.n)", "data.status > `1`"])
def test_a_filter_that_raises_on_an_event_fails_alone(expression: str) -> None:
    with pytest.raises(FilterFailed):
        filter_matches(expression, ENVELOPE)


DOUBLED = "[@,@]" + "|[@,@]" * 60  # a list of 2^61 leaves, 61 lists in memory


@pytest.mark.parametrize(
    ("expression", "spent"),
    [
        ("data.s" + "|join('',[@,@])" * 67, "units"),  # 2^67 times 1 MB
        (DOUBLED + "|to_string(@)", "(steps|units)"),  # its leaves are the event
        (f"({DOUBLED}) == ({DOUBLED})", "steps"),  # == walks both trees
        (f"contains({DOUBLED}, `1`)", "steps"),
        (" || ".join(["data.many[?n == `-1`]"] * 10), "steps"),  # 10 walks of 20,000
        # an integer of 4,300 digits, 16^3 times in a list: to_string would write 17 MB
        # in one call (second review)
        (
            "'" + "9" * 43 + "'|join('',[@,@,@,@,@,@,@,@,@,@])|join('',[@,@,@,@,@,@,@,@,@,@])"
            "|to_number(@)|[@,@,@,@,@,@,@,@,@,@,@,@,@,@,@,@]|[@,@,@,@,@,@,@,@,@,@,@,@,@,@,@,@]"
            "|[@,@,@,@,@,@,@,@,@,@,@,@,@,@,@,@]|to_string(@)",
            "units",
        ),
        ("join(join('', [data.s, data.s, data.s, data.s]), [data.s, data.s, data.s])", "units"),
        ("join('', [" + ", ".join(["data.s"] * 40) + "])", "units"),  # 40 MB in one call
        # 200 distinct equal strings of 1 MB, sorted: compared byte by byte (third review)
        (
            "[data.s, join('', [data.s, ''])]|[@,@,@,@,@,@,@,@,@,@]|[]|[@,@,@,@,@,@,@,@,@,@]|[]"
            "|length(sort(@))",
            "units",
        ),
        ("contains(data.empties, 'x')", "steps"),  # the walk itself is charged as it goes
        ("[" + ", ".join(["sum(data.zeros)"] * 100) + "]", "steps"),  # 3.6 s (fourth review)
        ("to_string([" + ", ".join(["data.c"] * 22) + "])", "units"),  # \u0001: 6 bytes each
        # fifth review: flattening 300,000 empty lists made nothing, and cost no step
        (" || ".join(["data.empties[]"] * 100), "steps"),
        ("[" + ", ".join(["to_number(data.s)"] * 50) + "]", "units"),  # int() reads it all
        ("length([" + ", ".join(["merge(data.o)"] * 30) + "])", "units"),  # 50 bytes a key
    ],
    ids=[
        "join",
        "to_string",
        "equality",
        "contains",
        "walks",
        "digits",
        "separator",
        "mentions",
        "sort",
        "a long walk",
        "sums",
        "escapes",
        "flattens",
        "to_number",
        "merges",
    ],
)
def test_a_filter_that_would_cost_without_end_spends_its_budget_and_fails(
    expression: str, spent: str
) -> None:
    """Each of these was accepted and would fill memory or hold the worker's loop for good
    (reviews); each fails within its budget (about 60 ms of steps at most)."""
    data = {
        "many": [{"n": n} for n in range(20_000)],
        "s": "x" * 1_000_000,
        "empties": [[] for _ in range(300_000)],
        "zeros": [0] * 500_000,
        "c": "\x01" * 180_000,  # 22 of them: within the budget at 1 unit a character
        "o": {str(n): 0 for n in range(40_000)},
    }
    envelope = {**ENVELOPE, "data": data}
    tracemalloc.start()
    try:
        with pytest.raises(FilterFailed, match=f"spent their budget .*{spent}"):
            filter_matches(expression, envelope)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_000_000  # refused before it made what it asked for, not after


def test_a_budget_is_shared_by_the_filters_it_is_given_to() -> None:
    """One owner's filters on one event share a budget: a costly one leaves less for the
    next; another budget is whole. A filter over 20,000 elements fits in one."""
    envelope = {**ENVELOPE, "data": {"many": [{"n": n} for n in range(20_000)]}}
    walk = "length(data.many[?n == `7`]) == `1`"
    budget = FilterBudget()
    assert filter_matches(walk, envelope, budget)
    assert 0 < budget.steps < FilterBudget().steps and budget.units < FilterBudget().units
    with pytest.raises(FilterFailed):
        for _ in range(10):
            filter_matches(walk, envelope, budget)
    assert budget.steps == 0
    assert filter_matches(walk, envelope, FilterBudget())


def test_filters_that_point_into_a_big_event_are_charged_what_they_make() -> None:
    """Five filter projections over a 1 MB event, in one budget: each is charged the list
    it makes, not the event it points into (they failed at the fifth: second review)."""
    items = [{"k": n, "pad": "x" * 250} for n in range(4_000)]
    envelope = {**ENVELOPE, "data": {"items": items}}
    budget = FilterBudget()
    for _ in range(5):
        assert filter_matches("length(data.items[?k >= `0`]) > `0`", envelope, budget)


def test_a_comparison_costs_the_same_either_way_round() -> None:
    """`==` and `!=` read values of different lengths no further than their lengths, and
    `<` two strings up to the shorter: a big list or string against a short one costs next
    to nothing, whichever side it is on (the left one was walked: fourth and fifth
    reviews)."""
    big = {"items": [{"k": n} for n in range(60_000)], "s": "x" * 900_000}
    envelope = {**ENVELOPE, "data": {**big, "a": [[0] * 150_000], "b": [1]}}
    budget = FilterBudget()
    for expression in ("data.items != `[]`", "`[]` != data.items", "data.s != ''", "'' != data.s",
                       "data.s > 'a'", "'a' < data.s", "data.a != data.b",
                       "data.b != data.a"):  # fmt: skip
        assert filter_matches(expression, envelope, budget), expression
    assert budget.steps > FilterBudget().steps - 100 and budget.units > FilterBudget().units - 10


def test_equality_costs_what_python_reads() -> None:
    """`==` is done a pair at a time, stopping where Python stops: 10,000 comparisons of two
    44,000-key objects with no key in common cost a step or two each (every key was looked
    at, for nothing: 12 s; sixth review), and two long lists that differ at their first
    item are unequal at once, however often compared (each cost its length: the budget
    ran out). They answer as plain JMESPath does."""
    data = {
        "a": {f"k{n}": 0 for n in range(44_000)},
        "b": {f"j{n}": 0 for n in range(44_000)},
        "x": [1] + [0] * 60_000,
        "y": [2] + [0] * 60_000,
    }
    envelope = {**ENVELOPE, "data": data}
    tenfold = "[*].[@,@,@,@,@,@,@,@,@,@][]"
    many = f"[data,data,data,data,data,data,data,data,data,data]|{tenfold}|{tenfold}|{tenfold}"
    for expression in (f"{many}|length([?a==b]) == `0`", "!(data.x == data.y || data.x == data.y)"):
        assert filter_matches(expression, envelope), expression
        assert jmespath.search(expression, envelope) is True


def test_equality_answers_as_plain_jmespath() -> None:
    """`==` and `!=`, done a pair at a time, answer as JMESPath does on 2,000 pairs of
    seeded random JSON values, each also against a copy of itself (a dict's second key
    was looked up in the pair compared last: the seventh review's `{"a": 1, "b": 2}`)."""
    rng = random.Random(3)
    atoms: list[Any] = [0, 1, True, False, None, "a", "", 0.0, 1.0, "b"]

    def value(depth: int = 0) -> Any:
        roll = rng.random()
        if depth > 2 or roll < 0.4:
            return rng.choice(atoms)
        if roll < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {key: value(depth + 1) for key in rng.sample("abcq", rng.randint(0, 3))}

    values = [value() for _ in range(100)] + [{"a": 1, "b": 2}, {"b": 2, "a": 1}]
    pairs = [(a, rng.choice(values)) for a in values for _ in range(10)]
    pairs += [(a, copy.deepcopy(a)) for a in values]
    for a, b in pairs:
        envelope = {**ENVELOPE, "data": {"a": a, "b": b}}
        for expression in ("data.a == data.b", "data.a != data.b"):
            expected = jmespath.search(expression, envelope)
            assert filter_matches(expression, envelope) is expected, (expression, a, b)


@pytest.mark.parametrize("nested", ["(" * 500 + "a" + ")" * 500, "!" * 1000 + "a"])
def test_a_filter_nested_past_the_parsers_reach_is_refused(nested: str) -> None:
    with pytest.raises(InvalidInput, match="nested too deeply"):
        Options(filter=nested).checked()


def test_a_shadowed_target_is_dropped_only_when_one_of_its_shadows_takes_the_event() -> None:
    submitted: list[Any] = []
    filters = Filters(Keys(), SimpleNamespace(submit=submitted.append))  # type: ignore[arg-type]
    event: Any = SimpleNamespace(id="e", event="BUILD_END", project_id="p", data={"s": "OK"})

    def target(cid: int, expression: str | None = None) -> CallbackTarget:
        return CallbackTarget(cid, "http://h.example/", Region.OSS, "t", project_id="p",
                              options=Options(filter=expression))  # fmt: skip

    plain = [target(1), target(2)]
    assert filters.select(event, plain) is plain  # no filter, no shadow: as it came
    failed, ok, fails = "data.s == 'FAILED'", "data.s == 'OK'", "abs(data.s)"
    chunk = [target(1), target(2), target(3, failed), target(4, ok), target(5, fails)]
    shadows = {
        1: (Shadow(3, failed, "op"),),  # in the chunk, skips it: 1 goes
        2: (Shadow(4, ok, "op"),),  # in the chunk, takes it: 2 does not
        6: (Shadow(9, ok, "op"),),  # in another chunk, takes it
        7: (Shadow(8, failed, "op"), Shadow(5, fails, "op")),  # one skips, one fails on it: 7 goes
    }
    chunk += [target(6), target(7)]
    assert [t.id for t in filters.select(event, chunk, shadows)] == [1, 4, 7]
    assert len(submitted) == 1  # 5's failure, counted once: where it is a target


def test_a_shadows_filter_run_again_spends_its_owners_budget_not_the_targets() -> None:
    """A shadow in another chunk has its filter run again where its target is: on its own
    owner's budget. It ran on the target's owner's: the operator's costly filter spent the
    project's budget (the project's own filter then failed, the URL got nothing), and a
    project that spent its own budget first made the operator's filter fail (taken as no
    take: the URL got the event twice), or learnt what it spent (review)."""
    submitted: list[Any] = []
    filters = Filters(Keys(), SimpleNamespace(submit=submitted.append))  # type: ignore[arg-type]

    def target(cid: int, expression: str | None = None) -> CallbackTarget:
        return CallbackTarget(cid, "http://h.example/", Region.OSS, "t", project_id="p",
                              options=Options(filter=expression))  # fmt: skip

    walk = "length(data.items[?@ == `-1`])"  # a walk of every item: costly

    def event(items: int) -> Any:
        data = {"status": "OK", "items": list(range(items))}
        return SimpleNamespace(id="e", event="BUILD_END", project_id="p", data=data)

    # the operator's costly filter skips it; the project's own costly filter takes it
    over = {2: (Shadow(9, walk + " > `0`", PLATFORM_PROJECT),)}
    got = filters.select(event(15_000), [target(2, walk + " == `0`")], over)
    assert [t.id for t in got] == [2] and submitted == []
    # the project spends its budget on its own filter; the operator's cheap one still takes it
    over = {2: (Shadow(9, "data.status == 'OK'", PLATFORM_PROJECT),)}
    got = filters.select(event(30_000), [target(1, walk + " == `0`"), target(2)], over)
    assert [t.id for t in got] == []


def test_during_a_rotation_both_secrets_sign_and_the_token_header_is_the_new_one() -> None:
    body = b'{"event":"BUILD_END","data":{}}'
    headers = request_headers(
        event="BUILD_END",
        delivery_id="evt_1.7",
        body=body,
        token="new-secret",
        user_agent="t",
        previous_token="old-secret",
    )
    assert headers["X-DEVOPS-WEBHOOK-TOKEN"] == "new-secret"
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in ("new-secret", "old-secret"):
        Webhook("whsec_" + base64.b64encode(secret.encode()).decode()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"other").decode()).verify(body, headers)
    alone = request_headers(
        event="BUILD_END", delivery_id="evt_1.7", body=body, token="new-secret", user_agent="t"
    )
    assert " " not in alone["webhook-signature"]


def test_the_catalogue_lists_the_18_events_with_levels_and_examples() -> None:
    assert [info.event for info in CATALOGUE] == list(Event)
    for info in CATALOGUE:
        assert Level.PLATFORM in info.levels and info.emitted_by and info.example
        assert (Level.PIPELINE in info.levels) == (info.event not in PIPELINELESS_EVENTS)
        assert info.example["projectId"] == "demo"
    build_end = next(info for info in CATALOGUE if info.event is Event.BUILD_END)
    assert {"pipelineId", "buildId", "buildNo", "status", "startTime", "endTime"} <= set(
        build_end.example
    )
    task = next(info for info in CATALOGUE if info.event is Event.BUILD_TASK_END)
    assert {"stageId", "jobId", "taskId"} <= set(task.example)


class _Ends(Step):
    """A step that only ends its job (a `deliver` job's last attempt, say)."""

    def __call__(self, pipe: Any, delay: float | None) -> None:
        pipe.delete("job")  # its end, when not carried by the record

    def job_end(self, delay: float | None) -> JobEnd | None:
        return JobEnd("queue", "lease", "job", "claims", "token", "demo:1")


@pytest.mark.parametrize(
    ("joint", "raises", "given_back"),
    [
        (True, False, 0),  # the release ran with the batch's others
        (True, True, 1),  # taken, then its write refused: given back again
        (False, True, 1),  # the run raised before its write
        (False, False, 0),  # the write queued the release itself
    ],
)
async def test_a_slot_is_given_back_once_its_write_lands_or_again_when_it_did_not(
    joint: bool, raises: bool, given_back: int
) -> None:
    submitted: list[Any] = []
    reads = SimpleNamespace(together=lambda script: asyncio.sleep(0, result=0))
    writer = SimpleNamespace(submit=submitted.append)
    controls = Controls(Settings(), Keys(), reads, writer, Shares(10, 10))  # type: ignore[arg-type]
    target = CallbackTarget(7, "http://h.example/", Region.OSS, "t",
                            options=Options(max_in_flight=5))  # fmt: skip

    async def attempt(then: Any, held: Any) -> None:
        held.release(0.0)  # the engine: once its request is over
        if joint:  # the engine: the release with the batch's others, the end in the record
            assert isinstance(then.joint(None), Release) and then.job_end(None) is not None
        elif not raises:  # the engine: the step queued in the write
            pipe = Redis().pipeline(transaction=False)
            then(pipe, None)
            assert len(pipe) == 2  # the release, then the job's end
        if raises:
            raise ConnectionError("the write was refused")

    async def put_off(wait: float, reason: str) -> None:
        raise AssertionError("admitted: never put off here")

    async def checked() -> None:  # its lease: still ours
        pass

    job = SimpleNamespace(job_id="demo:1", delivery_id="d", project_id="demo", emitter="demo")
    with contextlib.suppress(ConnectionError):
        await controls.admitted(job, target, _Ends(), attempt, put_off, checked)  # type: ignore[arg-type]
    assert len(submitted) == given_back
    assert all(isinstance(queue.__self__, Release) for queue in submitted)


def test_a_slot_outlives_the_longest_an_admitted_attempt_takes() -> None:
    """An admitted attempt holds its share of the worker already (it waited for it before
    its start was taken): its lease may be checked (`fence.CONFIRM_WAIT_S`), then its
    request takes up to the total timeout; its `maxInFlight` slot lapses only past both, so
    no other delivery takes it while the request runs."""
    settings = Settings()
    controls = Controls(settings, Keys(), SimpleNamespace(), SimpleNamespace(), Shares(1, 1))  # type: ignore[arg-type]
    assert controls.slot_ms > (CONFIRM_WAIT_S + settings.total_timeout) * 1000
