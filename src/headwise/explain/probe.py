"""The Lookback Lens probe: a logistic regression from lookback ratios to "this span is not supported".

Chuang et al. 2024 average each head's lookback ratio over a span of generated tokens (one feature per layer
and head), standardise the features and fit a logistic regression; the probe's probability flags spans the
context does not support. :class:`Probe` holds the fitted numbers as plain JSON (never pickle), so scoring needs
neither scikit-learn nor trust in the file beyond its numbers.

Evaluation is by AUROC, out of fold: folds keep a context's answers together (they share a prefill, and a probe
must not be scored on a context it saw), and a held-out task kind is scored by a probe fitted on the other
kinds. Intervals resample whole contexts (:func:`auroc_interval`).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from headwise.errors import HeadwiseError
from headwise.report.html import write_atomic

FORMAT = "headwise-lookback-probe/1"


@dataclass(frozen=True)
class Probe:
    """Standardise (``mean``, ``scale``), then ``sigmoid(weights . x + bias)`` = P(unsupported), on the span
    means of the lookback ratios of the heads ``features`` (flat indices ``layer * heads + head``)."""

    model: str
    layers: int
    heads: int
    features: list[int]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    report: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.features)
        if not n or any(len(v) != n for v in (self.mean, self.scale, self.weights)):
            raise HeadwiseError("a lookback probe needs as many means, scales and weights as features")
        if min(self.features) < 0 or max(self.features) >= self.layers * self.heads:
            raise HeadwiseError(f"a feature index is outside {self.layers} layers x {self.heads} heads")
        if min(self.scale) <= 0:
            raise HeadwiseError("a lookback probe's scales must be positive")

    def probability(self, ratios: np.ndarray) -> np.ndarray:
        """P(unsupported) of spans whose mean lookback ratios are ``ratios`` [..., layers, heads]."""
        ratios = np.asarray(ratios, dtype=np.float64)
        if ratios.shape[-2:] != (self.layers, self.heads):
            raise HeadwiseError(f"the probe reads {self.layers} layers x {self.heads} heads, got ratios of shape "
                                f"{ratios.shape} (a probe trained on another model?)")
        x = ratios.reshape(*ratios.shape[:-2], -1)[..., self.features]
        z = ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.weights) + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1)

    def save(self, path: Path) -> None:
        write_atomic(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> Probe:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeadwiseError(f"cannot read the lookback probe '{path}': {exc}") from exc
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise HeadwiseError(f"'{path}' is not a headwise lookback probe (format {FORMAT})")
        try:
            return cls(**data)
        except TypeError as exc:
            raise HeadwiseError(f"malformed lookback probe '{path}': {exc}") from exc


def fit(x: np.ndarray, y: np.ndarray, *, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Standardise ``x`` [n, f] and fit an L2 logistic regression to ``y`` (1: unsupported); return the means,
    scales, weights and bias. ``strength`` is the inverse regularisation (scikit-learn's ``C``)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(y.tolist())) != 2:
        raise HeadwiseError("a probe needs supported and unsupported answers to learn from")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    model = LogisticRegression(C=strength, max_iter=5000).fit((x - mean) / scale, y)
    return mean, scale, model.coef_[0], float(model.intercept_[0])


def predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, strength: float = 1.0) -> np.ndarray:
    """P(unsupported) of ``x_test`` by a probe fitted on the training rows."""
    mean, scale, weights, bias = fit(x_train, y_train, strength=strength)
    return 1.0 / (1.0 + np.exp(-(((x_test - mean) / scale) @ weights + bias)))


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: the chance that a random positive (label 1) scores above a random negative,
    ties counting half (the Mann-Whitney statistic); nan without both classes."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    start = 0
    for end in range(1, len(s) + 1):  # average ranks over ties
        if end == len(s) or sorted_s[end] != sorted_s[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_interval(scores: Sequence[float], labels: Sequence[int], clusters: Sequence[Hashable], *,
                   resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auroc`, resampling whole clusters (contexts); resamples without
    both classes are skipped."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=int)
    names = sorted(set(clusters), key=repr)
    members = [np.flatnonzero([c == name for c in clusters]) for name in names]
    rng = np.random.default_rng(seed)
    values = []
    for draw in rng.integers(0, len(names), size=(resamples, len(names))):
        index = np.concatenate([members[i] for i in draw])
        value = auroc(s[index], y[index])
        if value == value:
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: Sequence[Hashable], *, folds: int = 5, seed: int = 0,
                strength: float = 1.0) -> np.ndarray:
    """Each row's P(unsupported) from a probe fitted on the folds without its group (stratified group k-fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    out = np.full(len(y), np.nan)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups=list(map(repr, groups))):
        out[test] = predict(x[train], y[train], x[test], strength=strength)
    return out
