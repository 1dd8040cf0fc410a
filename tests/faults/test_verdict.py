"""The fault tests' verdict is as strict as DESIGN's "Job lifecycle": a drop ends a delivery
only for a reason the test allows, a delivery ends one way (a drop beside its ending is a
stray), and a 2xx needs a SUCCESS record (any record will not do)."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from dispatcher.models import DeliveryStatus, HistoryRecord
from dispatcher.settings import Settings
from dispatcher.worker.lanes import GONE as CALLBACK_GONE  # the drop's reason, as written
from tests.faults.chaos import Answer, FlakyReceiver, judge, keys


def failed_for_good(delivery_id: str, at_ms: int) -> HistoryRecord:
    return HistoryRecord(
        id=1, project_id="p", call_back_url="http://r/", events="BUILD_END",
        status=DeliveryStatus.FAILED, start_time=at_ms, end_time=at_ms + 10,
        created_time=at_ms + 10, delivery_id=delivery_id, final=True,
    )  # fmt: skip


async def test_a_drop_ends_a_delivery_only_for_a_reason_the_test_allows(
    redis: Redis, settings: Settings
) -> None:
    for delivery_id, reason in (("p:e1.1", CALLBACK_GONE), ("p:e2.1", "body gone")):
        drop = {"deliveryId": delivery_id, "reason": reason}
        await redis.lpush(keys.DROPPED, orjson.dumps(drop))  # type: ignore[misc]
    expected, none = {"p:e1.1", "p:e2.1"}, FlakyReceiver()
    strict = await judge(redis, [], expected, none, settings)
    assert strict.dropped == {"p:e1.1": CALLBACK_GONE, "p:e2.1": "body gone"}
    assert not strict.ended
    lenient = await judge(redis, [], expected, none, settings, frozenset({CALLBACK_GONE}))
    assert lenient.ended == {"p:e1.1"} and lenient.dropped == {"p:e2.1": "body gone"}


async def test_a_drop_beside_an_ending_is_a_stray_unless_the_test_allows_it(
    redis: Redis, settings: Settings
) -> None:
    """Two workers ended one delivery two ways (one sent it, one dropped it): the drop is
    named, however the delivery ended, whatever else its drops say."""
    success = failed_for_good("p:e1.1", 1_000).model_copy(
        update={"status": DeliveryStatus.SUCCESS, "final": False}
    )
    records = [success, failed_for_good("p:e2.1", 2_000), failed_for_good("p:e3.1", 3_000)]
    for delivery_id, reason in (("p:e1.1", "body gone"), ("p:e2.1", CALLBACK_GONE),
                                ("p:e4.1", CALLBACK_GONE), ("p:e4.1", "body gone")):  # fmt: skip
        drop = {"deliveryId": delivery_id, "reason": reason}
        await redis.lpush(keys.DROPPED, orjson.dumps(drop))  # type: ignore[misc]
    expected, none = {"p:e1.1", "p:e2.1", "p:e3.1", "p:e4.1"}, FlakyReceiver()
    strict = await judge(redis, records, expected, none, settings)
    assert strict.ended == {"p:e1.1", "p:e2.1", "p:e3.1"}
    assert strict.strays == {"p:e1.1": "body gone", "p:e2.1": CALLBACK_GONE}
    assert strict.dropped == {"p:e4.1": f"body gone; {CALLBACK_GONE}"}  # sorted
    with pytest.raises(AssertionError, match="ended and dropped besides 2") as failed:
        strict.assert_nothing_lost()
    assert "p:e1.1 ended, and dropped besides: 'body gone'" in str(failed.value)
    lenient = await judge(redis, records, expected, none, settings, frozenset({CALLBACK_GONE}))
    assert lenient.ended == expected and not lenient.dropped
    assert lenient.strays == {"p:e1.1": "body gone", "p:e4.1": "body gone"}


async def test_a_2xx_answer_needs_a_success_record(redis: Redis, settings: Settings) -> None:
    """A delivery the receiver answered 2xx, whose only record is a final FAILED one of
    another attempt, has ended, but its 2xx is unrecorded."""
    answered = FlakyReceiver(answers=[Answer("p:e1.1", 5_000, 5_010, 200)])
    verdict = await judge(redis, [failed_for_good("p:e1.1", 1_000)], {"p:e1.1"}, answered,
                          settings)  # fmt: skip
    assert verdict.ended == {"p:e1.1"} and verdict.unrecorded == {"p:e1.1"}
