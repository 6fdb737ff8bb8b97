"""Layer budgets (PyramidKV schedule) against a naive reference on random inputs: the mean is kept exactly."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from headwise.budgets import chunk_scores, layer_budgets, layer_fractions
from headwise.errors import HeadwiseError


def naive_shifted(mean: int, fractions: list[float], low: int, high: int) -> list[float]:
    """The real-valued budgets ``clip(mean * f + c, low, high)``, with the shift ``c`` found by bisection."""
    total = min(max(mean * len(fractions), low * len(fractions)), high * len(fractions))

    def clipped(c: float) -> list[float]:
        return [min(max(mean * f + c, low), high) for f in fractions]

    a, b = -10.0 * (high + mean + 1), 10.0 * (high + mean + 1)
    for _ in range(200):
        c = (a + b) / 2
        a, b = (c, b) if sum(clipped(c)) < total else (a, c)
    return clipped((a + b) / 2)


@pytest.mark.parametrize("seed", range(40))
def test_layer_budgets_keep_the_mean_within_bounds_near_the_naive_water_filling(seed):
    rng = random.Random(seed)
    layers = rng.randint(1, 12)
    high = rng.randint(1, 300)
    low = rng.randint(0, high)
    mean = rng.randint(0, high)
    fractions = [rng.uniform(0, 2) for _ in range(layers)]
    counts = layer_budgets(mean, fractions, low, high)
    assert sum(counts) == min(max(mean, low), high) * layers  # the mean, exactly
    assert all(low <= c <= high for c in counts)
    assert all(abs(c - x) < 1 + 1e-6 for c, x in zip(counts, naive_shifted(mean, fractions, low, high), strict=True))


@pytest.mark.parametrize("seed", range(40))
def test_pyramid_layer_budgets_shrink_with_depth_and_keep_the_mean_at_any_ratio(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 32)
    seen = rng.randint(1, 4096)
    mean = rng.randint(0, seen)  # from nearly nothing removed to nearly everything
    low = rng.randint(0, min(seen, 96))
    fractions = layer_fractions(layers, "pyramid", slope=rng.uniform(0, 0.99))
    counts = layer_budgets(mean, fractions, low, seen)
    assert sum(counts) == max(mean, low) * layers
    assert all(a >= b for a, b in itertools.pairwise(counts))
    assert all(low <= c <= seen for c in counts)


def test_layer_budgets_give_what_a_clipped_layer_cannot_keep_to_the_others():
    # 10% removed of 100 tokens: the first layer would keep 135 of its 100, and its 35 lift the second one to
    # its 100 as well; the last layer takes the rest (45 + 25).
    assert layer_budgets(90, [1.5, 1.0, 0.5], 0, 100) == [100, 100, 70]
    assert layer_budgets(80, [1.5, 1.0, 0.5], 0, 100) == [100, 90, 50]  # 120 -> 100: 10 each to the others
    assert layer_budgets(80, [1.5, 1.0, 0.5], 0, 101) == [101, 90, 49]  # halves: the earlier layer rounds up
    # A floor of 32 lifts the last layer from 20; the 12 it takes come evenly from the other two.
    assert layer_budgets(40, [1.5, 1.0, 0.5], 32, 100) == [54, 34, 32]
    assert layer_budgets(40, [1.0, 1.0, 1.0], 0, 100) == [40, 40, 40]
    assert layer_budgets(10, [1.5, 0.5], 32, 100) == [32, 32]  # below every floor: all at the floor


@pytest.mark.parametrize("seed", range(10))
def test_chunk_scores_are_the_mean_of_each_run(seed):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n, size = rng.randrange(0, 70), rng.randrange(1, 20)
    scores = torch.randn(2, 3, n, generator=gen)
    got = chunk_scores(scores, size)
    expected = scores.clone()
    for start in range(0, n, size):  # naive: one run at a time
        run = scores[..., start:start + size]
        expected[..., start:start + size] = run.mean(dim=-1, keepdim=True)
    torch.testing.assert_close(got, expected)
    with pytest.raises(HeadwiseError, match="at least 1"):
        chunk_scores(scores, 0)
