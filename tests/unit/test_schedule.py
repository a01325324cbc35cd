"""The GPipe schedule as a table: which stage works on which microbatch at each clock tick."""

from __future__ import annotations

import pytest

from shards.schedule import Action, Phase, actions_of_stage, dependency, gpipe_schedule, microbatch_rows


def _ticks(schedule: list[Action]) -> list[str]:
    """One string per tick: the actions running then, e.g. 'F1.0 F0.1'."""
    by_tick: dict[int, list[str]] = {}
    for action in schedule:
        by_tick.setdefault(action.tick, []).append(str(action))
    return [" ".join(by_tick[t]) for t in sorted(by_tick)]


@pytest.mark.parametrize("microbatches, stages, phase, expected", [
    (1, 1, Phase.FORWARD, ["F0.0"]),
    (1, 3, Phase.FORWARD, ["F0.0", "F0.1", "F0.2"]),
    (3, 1, Phase.FORWARD, ["F0.0", "F1.0", "F2.0"]),
    (3, 2, Phase.FORWARD, ["F0.0", "F1.0 F0.1", "F2.0 F1.1", "F2.1"]),
    (4, 3, Phase.FORWARD, ["F0.0", "F1.0 F0.1", "F2.0 F1.1 F0.2", "F3.0 F2.1 F1.2", "F3.1 F2.2", "F3.2"]),
    (3, 2, Phase.BACKWARD, ["B0.1", "B0.0 B1.1", "B1.0 B2.1", "B2.0"]),
    (2, 3, Phase.BACKWARD, ["B0.2", "B0.1 B1.2", "B0.0 B1.1", "B1.0"]),
])
def test_gpipe_ticks(microbatches, stages, phase, expected):
    assert _ticks(gpipe_schedule(microbatches, stages, phase=phase)) == expected


@pytest.mark.parametrize("microbatches, stages", [(1, 1), (2, 2), (4, 3), (8, 2), (3, 5)])
def test_every_action_once_and_after_its_input(microbatches, stages):
    schedule = gpipe_schedule(microbatches, stages)
    assert len(schedule) == len(set(schedule)) == 2 * microbatches * stages
    assert [a.phase for a in schedule] == [Phase.FORWARD] * (len(schedule) // 2) + [Phase.BACKWARD] * (len(schedule) // 2)
    position = {a: i for i, a in enumerate(schedule)}
    for action in schedule:
        before = dependency(action, stages)
        if before is not None:
            assert position[before] < position[action] and before.tick == action.tick - 1
    # a phase takes M + S - 1 ticks, not M x S: the point of pipelining
    for phase in Phase:
        assert max(a.tick for a in schedule if a.phase is phase) == microbatches + stages - 2


@pytest.mark.parametrize("stage, expected", [
    (0, ["F0.0", "F1.0", "F2.0", "B0.0", "B1.0", "B2.0"]),
    (1, ["F0.1", "F1.1", "F2.1", "B0.1", "B1.1", "B2.1"]),
])
def test_a_stage_gets_its_microbatches_in_order(stage, expected):
    assert [str(a) for a in actions_of_stage(gpipe_schedule(3, 2), stage)] == expected


@pytest.mark.parametrize("action, expected", [
    (Action(0, Phase.FORWARD, 0, 0), None),
    (Action(3, Phase.FORWARD, 1, 2), Action(2, Phase.FORWARD, 1, 1)),
    (Action(0, Phase.BACKWARD, 0, 2), None),
    (Action(2, Phase.BACKWARD, 1, 1), Action(1, Phase.BACKWARD, 1, 2)),
])
def test_dependency(action, expected):
    assert dependency(action, 3) == expected


@pytest.mark.parametrize("microbatches, stages", [(0, 2), (2, 0), (-1, 1)])
def test_an_empty_schedule_is_refused_with_a_message(microbatches, stages):
    with pytest.raises(ValueError, match="at least 1 microbatch and 1 stage"):
        gpipe_schedule(microbatches, stages)


@pytest.mark.parametrize("batch, stages, size, expected", [
    (4, 2, None, [4]),  # under 8 rows: one call, as before pipelining
    (7, 3, None, [7]),
    (8, 2, None, [4, 4]),
    (32, 2, None, [8, 8, 8, 8]),  # 2 x stages
    (12, 3, None, [4, 4, 4]),  # at least 4 rows each
    (10, 2, None, [5, 5]),
    (5, 2, 2, [2, 2, 1]),  # an explicit size wins
    (3, 1, 8, [3]),
])
def test_microbatch_rows(batch, stages, size, expected):
    rows = microbatch_rows(batch, stages, size)
    assert [r.stop - r.start for r in rows] == expected
    assert rows[0].start == 0 and rows[-1].stop == batch and all(a.stop == b.start for a, b in zip(rows, rows[1:]))


def test_microbatch_rows_refuses_nonsense():
    with pytest.raises(ValueError, match="at least 1"):
        microbatch_rows(0, 2)
