"""Placement and key namespaces of shards, without servers."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from dispatcher.errors import Unavailable
from dispatcher.keys import Keys
from dispatcher.placement import Placed, Placement, rendezvous
from dispatcher.shard import ID_SPAN, Shard
from dispatcher.slots import cluster_tag, target_slot

PROJECTS = [f"project-{n}" for n in range(3000)]


def test_one_shard_keeps_todays_key_names() -> None:
    keys = Shard.single("dispatcher:queue").keys
    assert keys.QUEUE == "dispatcher:queue"
    assert keys.CALLBACK_SEQ == "dispatcher:cb:seq"
    assert keys.callback(7) == "dispatcher:cb:7"
    assert keys.arq_job("evt_1") == "arq:job:evt_1"
    assert keys.ARQ_IN_PROGRESS_PREFIX == "arq:in-progress:"
    assert keys.history_index("p", "BUILD_END", "http://x/").startswith("dispatcher:history:idx:p:")
    assert keys.arq_health_check() == "dispatcher:queue:health-check"
    assert Shard.single("q").id_floor == 0


def test_a_cluster_shard_keeps_every_key_in_its_slot() -> None:
    for index in range(6):
        keys = Keys.of_cluster_shard("dispatcher:queue", index)
        slot = target_slot(index)
        names = [
            keys.QUEUE, keys.CALLBACK_SEQ, keys.callback(1), keys.arq_job("e"),
            keys.ARQ_IN_PROGRESS_PREFIX + "e", keys.history_record(5), keys.delivery("d"),
            keys.history_index("{odd}", "BUILD_END", "u"), keys.match("p", "BUILD_END"),
            *keys.limits(3), keys.HISTORY_STREAM, keys.roles("*"), keys.stats(1),
        ]  # fmt: skip
        assert {key_slot(name.encode()) for name in names} == {slot}
        assert keys.namespace == "{" + cluster_tag(index) + "}"


def test_cluster_shards_halve_the_slot_range() -> None:
    assert [target_slot(n) for n in range(4)] == [0, 8192, 4096, 12288]
    masters = [range(0, 5461), range(5461, 10923), range(10923, 16384)]  # redis-cli's split
    first8 = [target_slot(n) for n in range(8)]
    per_master = [sum(slot in owned for slot in first8) for owned in masters]
    assert sorted(per_master) == [2, 3, 3]


def test_rendezvous_moves_only_what_the_new_shard_wins() -> None:
    before = {p: rendezvous(p, 3) for p in PROJECTS}
    after = {p: rendezvous(p, 4) for p in PROJECTS}
    moved = [p for p in PROJECTS if before[p] != after[p]]
    assert all(after[p] == 3 for p in moved)  # never between two old shards
    assert 0.2 < len(moved) / len(PROJECTS) < 0.3  # about 1/4
    counts = [list(after.values()).count(n) for n in range(4)]
    assert min(counts) > 0.2 * len(PROJECTS)


def test_an_explicit_placement_wins_and_a_move_freezes() -> None:
    placement = Placement(3)
    project = next(p for p in PROJECTS if rendezvous(p, 3) == 0)
    placement.explicit[project] = Placed.parse("2")
    assert placement.shard_of(project) == 2 and not placement.moving(project)
    placement.explicit[project] = Placed.parse("2>1")
    assert placement.shard_of(project) == 2 and placement.moving(project)
    assert str(Placed(2, 1)) == "2>1"
    placement.explicit[project] = Placed(7)  # past this process's list: refused, never
    with pytest.raises(Unavailable, match="moved to shard 7"):  # hashed elsewhere (review)
        placement.shard_of(project)


@pytest.mark.parametrize("index", [0, 1, 5])
def test_id_ranges_do_not_overlap(index: int) -> None:
    shard = Shard(index, Keys())
    assert shard.id_floor == index * ID_SPAN
    assert len(str(999 * ID_SPAN)) <= 15  # padded record ids keep their width
