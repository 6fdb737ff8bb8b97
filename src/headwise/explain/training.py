"""Fit and evaluate the lookback probe on the labelled generations of :mod:`headwise.explain.collect`.

What is reported (:func:`evaluate`), every AUROC with a 95% interval that resamples whole contexts:

- cross-validated AUROC on the training tasks (grouped folds: a context's answers stay together);
- AUROC on each held-out task kind, by a probe fitted on the training tasks only;
- the cross-validated AUROC within the full cache's answers and within the compressed caches' answers, so a
  probe that only tells caches apart shows up;
- the same out-of-fold AUROC within each cache (method and ratio) that gave both kinds of answer;
- a baseline: the same cross-validated probe on the answer's length alone (its generation steps), since made-up
  answers are often shorter or longer than copied ones;
- with a head profile: the probe on the profile's retrieval heads only, against as many other heads drawn at
  random, and the roles of the heads with the largest weights, which says whether the signal sits in the
  retrieval heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headwise.bench import store
from headwise.errors import HeadwiseError
from headwise.explain.probe import Probe, auroc, auroc_interval, fit, out_of_fold, predict


@dataclass(frozen=True)
class Dataset:
    """One row per answer with features: lookback ratios ``x`` [n, layers * heads], ``y`` 1 for unsupported,
    and each answer's context, task, method (``method@ratio``) and generation steps."""

    model: str
    layers: int
    heads: int
    x: np.ndarray
    y: np.ndarray
    contexts: list[str]
    tasks: list[str]
    methods: list[str]
    steps: np.ndarray

    def subset(self, keep: np.ndarray) -> Dataset:
        pick = np.flatnonzero(keep)
        return Dataset(self.model, self.layers, self.heads, self.x[pick], self.y[pick],
                       [self.contexts[i] for i in pick], [self.tasks[i] for i in pick],
                       [self.methods[i] for i in pick], self.steps[pick])


def load_dataset(paths: Sequence[Path]) -> Dataset:
    """The answers with features of the stores at ``paths`` (one model, one shape)."""
    records = []
    for path in paths:
        if not Path(path).exists() and not store.packed(Path(path)).exists():
            raise HeadwiseError(f"lookback data '{path}' does not exist: make it with `headwise lookback collect`")
        records += store.read_records(Path(path))
    shapes = {(r["model"], r.get("layers"), r.get("heads")) for r in records}
    if len(shapes) != 1 or None in next(iter(shapes), (None,)):
        raise HeadwiseError(
            f"the lookback data must come from one model with features, found {sorted(shapes, key=repr) or 'none'}")
    model, layers, heads = shapes.pop()
    rows = [(s, r) for r in records for s in r["samples"] if s.get("features") is not None]
    if not rows:
        raise HeadwiseError("the lookback data holds no answer with features")
    return Dataset(
        model, layers, heads, np.array([s["features"] for s, _ in rows], dtype=np.float64),
        np.array([0 if s["supported"] else 1 for s, _ in rows]), [s["context_id"] for s, _ in rows],
        [r["task"] for _, r in rows], [f"{r['method']}@{r['ratio']:g}" for _, r in rows],
        np.array([s["steps"] for s, _ in rows], dtype=np.float64),
    )


def _figure(scores: np.ndarray, data: Dataset) -> dict:
    lo, hi = auroc_interval(scores, data.y, data.contexts)
    return {"auroc": auroc(scores, data.y), "lo": lo, "hi": hi, "unsupported": int(data.y.sum()),
            "supported": int((1 - data.y).sum()), "contexts": len(set(data.contexts))}


def _cross_validated(data: Dataset, strength: float, columns: np.ndarray | None = None) -> np.ndarray:
    x = data.x if columns is None else data.x[:, columns]
    return out_of_fold(x, data.y, data.contexts, strength=strength)


def evaluate(data: Dataset, heldout: Sequence[str], *, strength: float = 1.0,
             roles: list[list[str]] | None = None, draws: int = 5) -> dict:
    """The figures of the module docstring, for a probe trained on the tasks not in ``heldout``."""
    unknown = sorted(set(heldout) - set(data.tasks))
    if unknown:
        known = ", ".join(sorted(set(data.tasks)))
        raise HeadwiseError(f"held-out task(s) {', '.join(unknown)} are not in the data ({known})")
    is_train = np.array([t not in heldout for t in data.tasks])
    train = data.subset(is_train)
    if len(set(train.y.tolist())) != 2:
        raise HeadwiseError("the training tasks need both supported and unsupported answers")
    oof = _cross_validated(train, strength)
    full = np.array([m.startswith("full@") for m in train.methods])
    figures = {
        "train_tasks": sorted(set(train.tasks)), "heldout_tasks": list(heldout), "strength": strength,
        "cross_validated": _figure(oof, train),
        "within_full_cache": _figure(oof[full], train.subset(full)) if full.any() else None,
        "within_compressed": _figure(oof[~full], train.subset(~full)) if (~full).any() else None,
        "length_only": _figure(out_of_fold(train.steps[:, None], train.y, train.contexts, strength=strength), train),
        "heldout": {},
        "per_cache": {},
    }
    for method in sorted(set(train.methods)):
        keep = np.array([m == method for m in train.methods])
        if len(set(train.y[keep].tolist())) == 2:
            figures["per_cache"][method] = _figure(oof[keep], train.subset(keep))
    for task in heldout:
        test = data.subset(np.array([t == task for t in data.tasks]))
        figures["heldout"][task] = _figure(predict(train.x, train.y, test.x, strength=strength), test)
    if roles is not None:
        figures["heads"] = _head_figures(train, strength, roles, draws)
    return figures


def _head_figures(train: Dataset, strength: float, roles: list[list[str]], draws: int) -> dict:
    flat = [role for row in roles for role in row]
    if len(flat) != train.x.shape[1]:
        raise HeadwiseError(f"the profile has {len(flat)} heads, the data {train.x.shape[1]}: another model?")
    retrieval = np.array([i for i, r in enumerate(flat) if r == "retrieval"])
    others = np.array([i for i, r in enumerate(flat) if r != "retrieval"])
    out: dict = {"retrieval_heads": len(retrieval)}
    if len(retrieval):
        out["retrieval_only"] = _figure(_cross_validated(train, strength, retrieval), train)
        rng = np.random.default_rng(0)
        random_aurocs = [auroc(_cross_validated(train, strength, rng.choice(others, len(retrieval), replace=False)),
                               train.y) for _ in range(draws)]
        out["random_others"] = {"draws": draws, "auroc_mean": float(np.mean(random_aurocs)),
                                "auroc_min": float(np.min(random_aurocs)), "auroc_max": float(np.max(random_aurocs))}
    weights = fit(train.x, train.y, strength=strength)[2]
    top = np.argsort(-np.abs(weights))[:10]
    out["top_heads"] = [{"layer": int(i) // train.heads, "head": int(i) % train.heads, "role": flat[i],
                         "weight": float(weights[i])} for i in top]
    return out


def train_probe(data: Dataset, heldout: Sequence[str], *, strength: float, report: dict) -> Probe:
    """The probe fitted on every answer of the training tasks, carrying ``report``."""
    train = data.subset(np.array([t not in heldout for t in data.tasks]))
    mean, scale, weights, bias = fit(train.x, train.y, strength=strength)
    return Probe(data.model, data.layers, data.heads, list(range(train.x.shape[1])), mean.tolist(), scale.tolist(),
                 weights.tolist(), bias, report)


def _cell(f: dict | None) -> list[str]:
    if f is None:
        return ["-", "-", "-"]
    return [f"{f['auroc']:.3f} [{f['lo']:.3f}, {f['hi']:.3f}]", f"{f['unsupported']} / {f['supported']}",
            str(f["contexts"])]


def markdown(figures: dict) -> str:
    """The AUROC table (and the head analysis) as Markdown."""
    train = ", ".join(figures["train_tasks"])
    rows = [(f"cross-validated, training tasks ({train})", figures["cross_validated"]),
            ("  within the full cache's answers", figures["within_full_cache"]),
            ("  within the compressed caches' answers", figures["within_compressed"]),
            ("  baseline: the answer's length alone", figures["length_only"])]
    rows += [(f"held-out task: {task}", f) for task, f in figures["heldout"].items()]
    lines = ["| evaluation | AUROC [95% CI] | unsupported / supported | contexts |", "| --- | --- | --- | --- |"]
    lines += ["| " + " | ".join([name, *_cell(f)]) + " |" for name, f in rows]
    if figures.get("per_cache"):
        lines += ["", "| within one cache (cross-validated) | AUROC [95% CI] | unsupported / supported | contexts |",
                  "| --- | --- | --- | --- |"]
        lines += ["| " + " | ".join([name, *_cell(f)]) + " |" for name, f in figures["per_cache"].items()]
    heads = figures.get("heads")
    if heads:
        lines += ["", f"Retrieval heads in the profile: {heads['retrieval_heads']}."]
        if "retrieval_only" in heads:
            r, o = heads["retrieval_only"], heads["random_others"]
            lines += [f"Probe on the retrieval heads only (cross-validated): {_cell(r)[0]}; on as many other heads "
                      f"drawn at random ({o['draws']} draws): mean {o['auroc_mean']:.3f} "
                      f"(min {o['auroc_min']:.3f}, max {o['auroc_max']:.3f})."]
        lines += ["", "| largest weights | role | weight |", "| --- | --- | --- |"]
        lines += [f"| layer {h['layer']} head {h['head']} | {h['role']} | {h['weight']:+.3f} |"
                  for h in heads["top_heads"]]
    return "\n".join(lines)
