"""The calibration gate: a task counts toward the headline at a model and length only if the full cache
scores at least :data:`GATE` on it, measured on :data:`CALIBRATION_SEED`, a seed that is never reported.

The sweep (:mod:`headwise.bench.runner`) runs the full cache on the calibration seed and stores those parts
with ``calibration: true``; :func:`gate` reads the result back from any list of records, so the report and the
command line print the same gate the store holds. No torch here: the report imports it.
"""

from __future__ import annotations

from collections.abc import Iterable

GATE = 0.9
CALIBRATION_SEED = 100
FULL = "full"

Gate = dict[tuple[str, str, int], tuple[float, int, bool]]


def gate(records: Iterable[dict], threshold: float = GATE, library: str = "headwise") -> Gate:
    """Per (model, task, length): the full cache's mean score over its calibration answers, their number,
    and whether the mean reaches ``threshold``."""
    scores: dict[tuple[str, str, int], list[float]] = {}
    for r in records:
        if r.get("calibration") and r["method"] == FULL and r["library"] == library:
            scores.setdefault((r["model"], r["task"], r["length"]), []).extend(s["score"] for s in r["samples"])
    return {k: (sum(v) / len(v), len(v), sum(v) / len(v) >= threshold) for k, v in sorted(scores.items())}
