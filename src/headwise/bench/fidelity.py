"""Rows of the answer-fidelity measure (``scripts/fidelity.py`` and its kvpress twin), standard library only.

A fidelity file is JSONL, one row per line, appended as each row finishes. ``row`` names it:

- ``full|SAMPLE_ID``: the full cache's greedy answer to a sample, ``answer`` (token ids) and ``text``;
- ``SPEC|RATIO|SAMPLE_ID``: that answer teacher-forced after the question on the context compressed by
  ``SPEC`` (a method and its options) at ``RATIO``; ``nll`` is the mean negative log-likelihood per answer
  token, ``top1`` the fraction of answer tokens that are still the top choice, ``task`` the sample's task.

Only the standard library is imported at module level (torch only inside :func:`answer_nll`), so the kvpress
peer environment can compute, read and write the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headwise.bench.store import append_record, read_lines

FULL_SPECS = ("full", "kvpress:full")


def answer_row(sample_id: str) -> str:
    """``row`` of the full cache's answer to a sample."""
    return f"full|{sample_id}"


def row_key(spec: str, ratio: float, sample_id: str) -> str:
    """``row`` of one method, ratio and sample."""
    return f"{spec}|{ratio}|{sample_id}"


def sample_of(row: str) -> str:
    """The sample id a ``row`` is about."""
    return row.rsplit("|", 1)[1]


def ratios_for(method: str, ratios: Sequence[float]) -> list[float]:
    """Ratios to run a method at: the full cache once, at 0."""
    return [0.0] if method == "full" else list(ratios)


def reference_answers(rows: dict[str, dict]) -> dict[str, list[int]]:
    """The full cache's answer token ids by sample id."""
    return {sample_of(key): r["answer"] for key, r in rows.items() if "answer" in r}


def answer_nll(logits: Any, answer: list[int]) -> tuple[float, float]:
    """Mean NLL per token of ``answer`` under ``logits`` [len(answer), vocab] and the fraction ranked first."""
    import torch

    logp = logits.float().log_softmax(dim=-1)
    target = torch.tensor(answer)
    nll = -logp[torch.arange(len(answer)), target].mean().item()
    return nll, (logp.argmax(dim=-1) == target).float().mean().item()


def add_row(path: Path, done: dict[str, dict], spec: str, ratio: float, sample_id: str, task: str,
            nll: float, top1: float) -> None:
    """Append one method-ratio-sample row to ``path`` (and ``done``), and print it."""
    key = row_key(spec, ratio, sample_id)
    done[key] = {"row": key, "spec": spec, "ratio": ratio, "task": task, "nll": nll, "top1": top1}
    append_record(path, done[key])
    print(f"{sample_id:24} {ratio:4} nll={nll:6.3f} top1={top1:5.2f}  {spec}", flush=True)


def read_rows(path: Path) -> dict[str, dict]:
    """Rows of a fidelity file by ``row`` (the last one wins); a torn last line is skipped and runs again."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    for line in read_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "row" in row:
            rows[row["row"]] = row
    return rows


def summary(rows: list[dict]) -> list[tuple[str, float, float, float, int, float | None]]:
    """``(spec, ratio, mean nll, mean top1, samples, excess)`` per spec and ratio, specs in order of appearance.

    ``excess`` is the mean of ``nll`` minus the full cache's own ``nll`` on the same sample (rows of spec
    ``full`` or ``kvpress:full``), or None when some sample has no full-cache row.
    """
    floor = {sample_of(r["row"]): r["nll"] for r in rows if r.get("spec") in FULL_SPECS}
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        if "spec" in r:
            groups.setdefault((r["spec"], r["ratio"]), []).append(r)
    order = {spec: i for i, spec in enumerate(dict.fromkeys(spec for spec, _ in groups))}
    out = []
    for (spec, ratio), g in sorted(groups.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        gaps = [r["nll"] - floor[sample_of(r["row"])] for r in g if sample_of(r["row"]) in floor]
        excess = sum(gaps) / len(g) if len(gaps) == len(g) else None
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
