"""A delivery's progress id is one emission's: `{delivery id}@{emittedAt}` (its retry job's
id, its mark's key, its lane entry), and the delivery id is read back from it."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from dispatcher.bodies import body_key
from dispatcher.jobs import BadJob, DeliveryJob, EventJob, delivery_of
from dispatcher.keys import Keys
from dispatcher.queue import Queue


def test_a_first_deliverys_progress_id_names_its_emission() -> None:
    event = EventJob(id="build-7", project_id="team@x", event="BUILD_END", emitted_at=1234)
    job = DeliveryJob.first(event, 42, b"{}")
    assert job.delivery_id == "team@x:build-7.42"
    assert job.progress_id == job.job_id == "team@x:build-7.42@1234"
    assert delivery_of(job.progress_id) == job.delivery_id
    again = DeliveryJob.first(EventJob(id="build-7", project_id="team@x", event="BUILD_END",
                                       emitted_at=5678), 42, b"{}")  # fmt: skip
    assert again.delivery_id == job.delivery_id and again.progress_id != job.progress_id


def test_an_event_queued_without_emitted_at_takes_its_jobs_enqueue_time() -> None:
    payload = {"id": "e", "projectId": "p", "event": "BUILD_END", "data": {}, "ids": "project"}
    assert EventJob.from_wire(payload, 99).emitted_at == 99
    assert EventJob.from_wire({**payload, "emittedAt": 7}, 99).emitted_at == 7
    # handed over to its next chunk, it carries the time it was given
    assert (
        EventJob.from_wire(EventJob.from_wire(payload, 99).continued(5).to_wire()).emitted_at == 99
    )
    unknown = DeliveryJob.first(EventJob.from_wire(payload), 3, b"{}")
    assert unknown.progress_id == unknown.delivery_id == "p:e.3"  # neither: the id alone


def test_the_delivery_id_is_read_back_from_any_progress_id() -> None:
    assert delivery_of("p:e.3@17") == "p:e.3"
    assert delivery_of("p:e.3") == "p:e.3"  # the version before's
    assert delivery_of("team@x:e.3") == "team@x:e.3"  # a project id may hold '@'
    assert delivery_of("team@x:e.3@17") == "team@x:e.3"
    assert delivery_of("p:e.3:redeliver:9f2c0e1a7b3d") == "p:e.3:redeliver:9f2c0e1a7b3d"


def test_a_retry_refers_to_its_emissions_body_kept_once() -> None:
    """`shared`: the job's bytes name the event's kept body (`dispatcher.bodies`) instead
    of holding it; an event that does not say when it was emitted keeps its body in its
    retries (its emissions could not be told apart), and so does a redelivery."""
    event = EventJob(id="build-7", project_id="team@x", event="BUILD_END", emitted_at=1234)
    job = DeliveryJob.first(event, 42, b'{"big": 1}', shared=True)
    wire = job.to_wire()
    assert wire["bodyOf"] == job.body_of == "team@x:build-7@1234" and "body" not in wire
    read = DeliveryJob.from_wire(wire, job.job_id)
    assert (read.body_of, read.body) == (job.body_of, b"")
    assert DeliveryJob.from_wire(DeliveryJob.first(event, 42, b"{}").to_wire()).body == b"{}"
    undated = EventJob(id="build-7", project_id="team@x", event="BUILD_END")
    assert DeliveryJob.first(undated, 42, b"{}", shared=True).body_of is None
    again = job.redelivery(9)
    assert again.body_of is None and again.to_wire()["body"] == '{"big": 1}'


def test_a_retry_read_back_names_its_own_events_body_and_is_never_sent_on_as_it_is() -> None:
    """A job's `bodyOf` must name its own emission's body (`{emitter}:{event
    id}@{emittedAt}`), so a job can never be made to send another project's or event's; a
    retry read back without its body read cannot be queued again or redelivered (it would
    send an empty body)."""
    event = EventJob(id="build-7", project_id="p", event="BUILD_END", emitted_at=1234)
    wire = DeliveryJob.first(event, 42, b'{"big": 1}', shared=True).to_wire()
    for forged in ("other:build-7@1234", "p:build-77@1234", "p:build-7", "p:build-7@99"):
        with pytest.raises(BadJob):
            DeliveryJob.from_wire({**wire, "bodyOf": forged}, "p:build-7.42@1234")
    laned = DeliveryJob.from_wire({**wire, "lane": "l1"}, "p:build-7.42@1234")
    assert body_key(Keys(), laned) == Keys().BODY_PREFIX + ":lane:p:build-7@1234"  # apart
    with pytest.raises(BadJob):  # a lane's job too names its own emission's body
        DeliveryJob.from_wire(
            {**wire, "lane": "l1", "bodyOf": "other:build-7@1234"}, "p:build-7.42@1234"
        )
    read = DeliveryJob.from_wire(wire, "p:build-7.42@1234")
    with pytest.raises(ValueError, match="kept body"):
        read.redelivery(9)
    with pytest.raises(ValueError, match="kept body"):
        Queue(Redis(), Keys()).push(Redis().pipeline(), read, defer_s=1)
