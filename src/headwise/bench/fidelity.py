"""Rows of the answer-fidelity measure (``scripts/fidelity.py`` and its kvpress twin), standard library only.

A fidelity file is JSONL, one row per line, appended as each row finishes. ``row`` names it:

- ``full|SAMPLE_ID``: the full cache's greedy answer to a sample, ``answer`` (token ids) and ``text``;
- ``SPEC|RATIO|SAMPLE_ID``: that answer teacher-forced after the question on the context compressed by
  ``SPEC`` (a method and its options) at ``RATIO``; ``nll`` is the mean negative log-likelihood per answer
  token, ``top1`` the fraction of answer tokens that are still the top choice, ``task`` the sample's task.

Only the standard library is imported, so the kvpress peer environment can read and write the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of a fidelity file by ``row`` (the last one wins); a torn last line is skipped and runs again."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "row" in row:
            rows[row["row"]] = row
    return rows


FULL_SPECS = ("full", "kvpress:full")


def summary(rows: list[dict]) -> list[tuple[str, float, float, float, int, float | None]]:
    """``(spec, ratio, mean nll, mean top1, samples, excess)`` per spec and ratio, specs in order of appearance.

    ``excess`` is the mean of ``nll`` minus the full cache's own ``nll`` on the same sample (rows of spec
    ``full`` or ``kvpress:full``), or None when some sample has no full-cache row.
    """
    floor = {r["row"].rsplit("|", 1)[1]: r["nll"] for r in rows if r.get("spec") in FULL_SPECS}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if "spec" in r:
            groups.setdefault((r["spec"], r["ratio"]), []).append(r)
    order = {spec: i for i, spec in enumerate(dict.fromkeys(spec for spec, _ in groups))}
    out = []
    for (spec, ratio), g in sorted(groups.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        ids = [r["row"].rsplit("|", 1)[1] for r in g]
        excess = sum(r["nll"] - floor[i] for r, i in zip(g, ids, strict=True)) / len(g) if all(
            i in floor for i in ids) else None
        out.append((spec, ratio, sum(r["nll"] for r in g) / len(g), sum(r["top1"] for r in g) / len(g), len(g), excess))
    return out


def format_summary(rows: list[dict]) -> str:
    """The summary as text lines (lower nll and higher top1 are closer to the full cache)."""
    return "\n".join(
        f"  {ratio:4}  nll={nll:6.3f}  top1={top1:5.3f}  n={n:3}  "
        + (f"over full={excess:+6.3f}  " if excess is not None else "")
        + spec
        for spec, ratio, nll, top1, n, excess in summary(rows)
    )
