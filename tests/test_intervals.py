"""Bootstrap intervals: equal to a hand-written loop with the same draws, cover a known mean, degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest

from headwise.bench.intervals import Interval, bootstrap_mean, excludes_zero, paired_difference
from headwise.errors import HeadwiseError


def percentile(sorted_stats: list[float], q: float) -> float:
    """numpy's default (linear) quantile, by hand."""
    pos = q * (len(sorted_stats) - 1)
    low = int(np.floor(pos))
    high = min(low + 1, len(sorted_stats) - 1)
    return sorted_stats[low] + (pos - low) * (sorted_stats[high] - sorted_stats[low])


def loop_bootstrap(values, clusters, strata, resamples, seed, level=0.95):
    """The documented algorithm, one resample and one value at a time."""
    rng = np.random.default_rng(seed)
    per_stratum = []
    for s in sorted(set(strata), key=repr):
        ids = sorted({c for c, t in zip(clusters, strata, strict=True) if t == s}, key=repr)
        members = [[v for v, c in zip(values, clusters, strict=True) if c == cid] for cid in ids]
        draw = rng.integers(0, len(ids), size=(resamples, len(ids)))
        means = []
        for row in draw:
            total, count = 0.0, 0
            for j in row:
                for v in members[j]:
                    total += v
                    count += 1
            means.append(total / count)
        per_stratum.append(means)
    stats = sorted(sum(m[r] for m in per_stratum) / len(per_stratum) for r in range(resamples))
    return percentile(stats, (1 - level) / 2), percentile(stats, (1 + level) / 2)


def test_equals_a_loop_with_the_same_draws():
    rng = np.random.default_rng(1)
    values = rng.random(40).round(2).tolist()
    clusters = [f"c{i // 3}" for i in range(40)]  # contexts of three answers (the last one of one)
    strata = ["passkey" if i < 21 else "qa" for i in range(40)]  # every context within one task
    got = bootstrap_mean(values, clusters, strata, resamples=300, seed=7)
    lo, hi = loop_bootstrap(values, clusters, strata, 300, 7)
    task_means = [np.mean(values[:21]), np.mean(values[21:])]
    assert got.mean == pytest.approx(np.mean(task_means))
    assert (got.lo, got.hi) == (pytest.approx(lo), pytest.approx(hi))
    plain = bootstrap_mean(values, resamples=300, seed=7, level=0.9)
    assert (plain.lo, plain.hi) == pytest.approx(loop_bootstrap(values, list(range(40)), [0] * 40, 300, 7, 0.9))
    assert bootstrap_mean(values, clusters, strata, resamples=300, seed=7) == got  # deterministic


def test_strata_weigh_tasks_equally():
    values = [1.0] * 30 + [0.0] * 10
    strata = ["a"] * 30 + ["b"] * 10
    assert bootstrap_mean(values, strata=strata).mean == pytest.approx(0.5)
    assert bootstrap_mean(values).mean == pytest.approx(0.75)


def test_covers_a_known_mean_about_as_often_as_it_says():
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for t in range(trials):
        x = rng.normal(0.3, 1.0, size=60)
        interval = bootstrap_mean(x, resamples=500, seed=t)
        covered += interval.lo <= 0.3 <= interval.hi
        assert interval.lo <= interval.mean <= interval.hi
    assert 0.90 <= covered / trials <= 0.98


def test_clusters_widen_the_interval_of_correlated_answers():
    rng = np.random.default_rng(2)
    context_effect = np.repeat(rng.normal(0, 1, size=20), 5)  # five answers share each context's draw
    x = context_effect + rng.normal(0, 0.1, size=100)
    clusters = np.repeat(np.arange(20), 5)
    naive = bootstrap_mean(x)
    clustered = bootstrap_mean(x, clusters)
    assert clustered.mean == pytest.approx(naive.mean)
    assert clustered.hi - clustered.lo > 1.8 * (naive.hi - naive.lo)  # about sqrt(5) wider


def test_paired_difference_is_the_bootstrap_of_differences():
    rng = np.random.default_rng(3)
    a = rng.random(50)
    b = a - 0.2 + rng.normal(0, 0.02, size=50)
    clusters = np.arange(50) // 5
    diff = paired_difference(a, b, clusters)
    assert diff == bootstrap_mean(a - b, clusters)
    assert diff.mean == pytest.approx(0.2, abs=0.01) and excludes_zero(diff)
    assert not excludes_zero(paired_difference(a, a + rng.normal(0, 0.05, size=50), clusters))
    assert excludes_zero(Interval(-0.1, -0.2, -0.01)) and not excludes_zero(Interval(0.0, float("nan"), float("nan")))


def test_degenerate_inputs():
    assert bootstrap_mean([0.1] * 9, [i // 3 for i in range(9)]) == (0.1, 0.1, 0.1)
    one = bootstrap_mean([0.0, 1.0, 1.0], ["ctx"] * 3)
    assert one.mean == pytest.approx(2 / 3) and np.isnan(one.lo) and np.isnan(one.hi)  # one cluster: no spread
    assert np.isnan(bootstrap_mean([1.0, 0.0, 1.0], ["x", "y", "y"], ["a", "b", "b"]).lo)  # one in a stratum
    with pytest.raises(HeadwiseError, match="non-empty"):
        bootstrap_mean([])
    with pytest.raises(HeadwiseError, match="finite"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(HeadwiseError, match="2 labels for 3"):
        bootstrap_mean([1.0, 2.0, 3.0], clusters=[0, 1])
    with pytest.raises(HeadwiseError, match="more than one stratum"):
        bootstrap_mean([1.0, 2.0, 3.0, 4.0], clusters=[0, 0, 1, 1], strata=["a", "b", "b", "b"])
    with pytest.raises(HeadwiseError, match="level"):
        bootstrap_mean([1.0, 2.0], level=1.0)
    with pytest.raises(HeadwiseError, match="resamples"):
        bootstrap_mean([1.0, 2.0], resamples=0)
    with pytest.raises(HeadwiseError, match="differ in number"):
        paired_difference([1.0], [1.0, 2.0])
