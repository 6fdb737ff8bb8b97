"""Bootstrap intervals for benchmark means, and paired intervals for the difference of two methods.

Pure numpy, no torch (the report imports it). Percentile bootstrap (Efron and Tibshirani, *An Introduction to
the Bootstrap*, 1993): resample, recompute the statistic, take the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of the resampled statistics (numpy's default linear interpolation).

Clusters
    The answers of one context share its prefill (and its compressed cache), so they are not independent.
    With ``clusters``, whole clusters are resampled: a resample draws as many clusters as there are, with
    replacement, and its mean is the sum of the drawn clusters' values over the number of values drawn.
    Without, every value is its own cluster (the ordinary bootstrap).
Strata
    A headline over several tasks is the mean of the task means, so every task weighs the same whatever its
    number of answers. With ``strata`` (a task per value), each stratum is resampled on its own (its clusters
    within it; a cluster must lie in one stratum) and the statistic is the mean of the strata's means.

Draws, for a reference implementation: ``numpy.random.default_rng(seed)``, then per stratum (one when
``strata`` is None; in the order of their ``repr``) one call ``rng.integers(0, k, size=(resamples, k))`` that
picks among its ``k`` clusters (also in the order of their ``repr``).

A stratum with a single cluster says nothing about the spread: the interval is then ``(nan, nan)``, not a
zero-width one. Constant values give ``lo == hi == mean``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from headwise.errors import HeadwiseError

LEVEL = 0.95
RESAMPLES = 2000


class Interval(NamedTuple):
    """A point estimate and its bootstrap interval (``lo``/``hi`` NaN when it cannot be estimated)."""

    mean: float
    lo: float
    hi: float


def _labels(name: str, labels: Sequence[Hashable] | None, n: int) -> list[Hashable] | None:
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != n:
        raise HeadwiseError(f"{name} has {len(labels)} labels for {n} values")
    return labels


def _groups(labels: Sequence[Hashable], members: Sequence[int]) -> list[list[int]]:
    """The indices of ``members`` grouped by their label, groups in sorted label order."""
    groups: dict[Hashable, list[int]] = {}
    for i in members:
        groups.setdefault(labels[i], []).append(i)
    return [groups[k] for k in sorted(groups, key=repr)]


def bootstrap_mean(
    values: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    strata: Sequence[Hashable] | None = None,
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` (of the strata's means, with ``strata``) and its percentile bootstrap interval,
    resampling whole ``clusters`` (see the module docstring). Deterministic for a given ``seed``."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise HeadwiseError("bootstrap needs a non-empty list of values")
    if not np.all(np.isfinite(x)):
        raise HeadwiseError("bootstrap values must be finite numbers")
    if not 0 < level < 1:
        raise HeadwiseError(f"the interval level must lie in (0, 1), got {level}")
    if resamples < 1:
        raise HeadwiseError(f"the number of resamples must be at least 1, got {resamples}")
    n = x.size
    cluster_of = _labels("clusters", clusters, n) or list(range(n))
    stratum_of = _labels("strata", strata, n) or [0] * n
    rng = np.random.default_rng(seed)
    means, resampled, spread = [], [], True
    seen: dict[Hashable, Hashable] = {}
    for members in _groups(stratum_of, range(n)):
        groups = _groups(cluster_of, members)
        for group in groups:
            key = cluster_of[group[0]]
            if seen.setdefault(key, stratum_of[group[0]]) != stratum_of[group[0]]:
                raise HeadwiseError(f"cluster {key!r} lies in more than one stratum")
        sums = np.array([x[g].sum() for g in groups])
        sizes = np.array([len(g) for g in groups], dtype=float)
        draw = rng.integers(0, len(groups), size=(resamples, len(groups)))
        means.append(sums.sum() / sizes.sum())
        resampled.append(sums[draw].sum(axis=1) / sizes[draw].sum(axis=1))
        spread &= len(groups) > 1
    constant = np.ptp(x) == 0
    mean = float(x[0] if constant else np.mean(means))  # constant values: no rounding noise from the sums
    if not spread:
        return Interval(mean, float("nan"), float("nan"))
    if constant:
        return Interval(mean, mean, mean)
    lo, hi = np.quantile(np.mean(resampled, axis=0), [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(lo), float(hi))


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    clusters: Sequence[Hashable] | None = None,
    strata: Sequence[Hashable] | None = None,
    *,
    level: float = LEVEL,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean of ``a - b`` over the same answers under two methods (``a[i]`` and ``b[i]`` one answer), with its
    bootstrap interval: the pairs are resampled together, by ``clusters`` within ``strata``."""
    if len(a) != len(b):
        raise HeadwiseError(f"paired values differ in number: {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return bootstrap_mean(diff, clusters, strata, level=level, resamples=resamples, seed=seed)


def excludes_zero(interval: Interval) -> bool:
    """Whether the interval lies wholly above or wholly below zero (False when it could not be estimated)."""
    return bool(interval.lo > 0 or interval.hi < 0)
