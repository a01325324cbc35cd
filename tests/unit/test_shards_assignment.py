"""Pure decisions as tables: cutting layers into stages, and which stage a joining peer claims."""

from __future__ import annotations

import random

import pytest

from shards import choose_stage, stage_boundaries


@pytest.mark.parametrize(
    "layers, stages, expected",
    [
        (1, 1, [(0, 1)]),
        (4, 1, [(0, 4)]),
        (4, 2, [(0, 2), (2, 4)]),
        (5, 2, [(0, 3), (3, 5)]),
        (6, 3, [(0, 2), (2, 4), (4, 6)]),
        (7, 3, [(0, 3), (3, 5), (5, 7)]),
        (8, 3, [(0, 3), (3, 6), (6, 8)]),
        (3, 3, [(0, 1), (1, 2), (2, 3)]),
        (32, 5, [(0, 7), (7, 14), (14, 20), (20, 26), (26, 32)]),
    ],
)
def test_stage_boundaries(layers, stages, expected):
    assert [(r.start, r.end) for r in stage_boundaries(layers, stages)] == expected


@pytest.mark.parametrize("layers", [1, 2, 7, 24, 80])
def test_stage_boundaries_are_contiguous_and_balanced(layers):
    for stages in range(1, layers + 1):
        ranges = stage_boundaries(layers, stages)
        assert ranges[0].start == 0 and ranges[-1].end == layers
        assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
        sizes = [len(r) for r in ranges]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize(
    "layers, stages, message",
    [
        (3, 4, "cannot cut 3 layers into 4 stages"),
        (3, 0, "num_stages must be at least 1, got 0"),
        (3, -2, "num_stages must be at least 1, got -2"),
        (0, 1, "cannot cut 0 layers into 1 stages"),
    ],
)
def test_stage_boundaries_refuses(layers, stages, message):
    with pytest.raises(ValueError, match=message):
        stage_boundaries(layers, stages)


@pytest.mark.parametrize(
    "coverage, expected",
    [([0], 0), ([5], 0), ([0, 0, 0], 0), ([1, 0, 1], 1), ([2, 1, 1], 1), ([1, 1, 0], 2), ([3, 2, 9, 2, 4], 1)],
)
def test_choose_stage_without_rng_takes_the_lowest_least_covered(coverage, expected):
    assert choose_stage(coverage) == expected


@pytest.mark.parametrize(
    "coverage, allowed",
    [([1, 0, 3, 0], {1, 3}), ([0, 0, 0], {0, 1, 2}), ([2, 1, 2], {1}), ([4, 4], {0, 1})],
)
def test_choose_stage_breaks_ties_at_random_among_the_least_covered(coverage, allowed):
    picks = {choose_stage(coverage, rng=random.Random(seed)) for seed in range(64)}
    assert picks == allowed
    assert choose_stage(coverage, rng=random.Random(7)) == choose_stage(coverage, rng=random.Random(7))


def test_choose_stage_refuses_no_stages():
    with pytest.raises(ValueError, match="no stages"):
        choose_stage([])
