"""Labelled generations for the lookback probe, made offline from the benchmark's calibrated tasks.

Each context of a task is prefilled once densely (:mod:`headwise.dense`) and compressed by every method and
ratio asked, as the benchmark does; each of its questions is answered greedily on a copy of each cache while
the lookback ratios are recorded (:func:`headwise.explain.lookback.traced_answer`). An answer's features are its
ratios averaged over the steps that generated it (one per layer and head), its label whether the context
supports it (:func:`headwise.explain.labels.supported`). The full cache gives mostly supported answers, strong
compression mostly made-up ones, and the moderate ratios both, so a probe has to tell answers apart within a
cache, not caches apart.

The store is the benchmark's (:mod:`headwise.bench.store`): one record per (context, method, ratio) part, keyed
as a benchmark part, resumable, refusing records of other code or versions; each answer row adds ``supported``,
``steps`` and ``features`` (``layers x heads`` ratios, row-major, 4 decimals; null for an answer of one token).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from headwise.bench import runner, store, tasks
from headwise.bench.calibration import CALIBRATION_SEED
from headwise.bench.scoring import score
from headwise.errors import HeadwiseError
from headwise.explain.labels import supported
from headwise.explain.lookback import traced_answer
from headwise.models import LoadedModel

#: The tasks SmolLM2-135M's full cache passes at 2K and 4K (BENCHMARKS.md, the calibration gate).
CALIBRATED_TASKS = ("passkey", "multikey", "vartrack", "qa")


def part_record(ctx: runner.Context, cell: runner.Cell) -> dict:
    """Answer every question of ``ctx`` on ``cell``'s cache with lookback ratios recorded; the part's record."""
    wall = time.perf_counter()
    cache, _, _ = ctx.compressed(cell, ctx.head)
    rows = []
    for sample, tail in zip(ctx.questions, ctx.tails, strict=True):
        traced = traced_answer(ctx.lm, cache, tail, sample.max_new_tokens)
        features = traced.ratios.mean(dim=0).flatten() if len(traced.ratios) else None
        rows.append({
            "id": sample.id, "context_id": sample.context_id, "output": traced.text, "answer_ids": traced.tokens,
            "answers": sample.answers, "score": score(sample.scoring, traced.text, sample.answers),
            "supported": supported(traced.text, sample.context), "steps": len(traced.ratios),
            "features": None if features is None else [round(float(v), 4) for v in features],
        })
    return {
        "key": cell.part_key(ctx.id, ctx.digest), "cell": cell.key(), **asdict(cell), "context_id": ctx.id,
        "score": sum(r["score"] for r in rows) / len(rows), "samples": rows,
        "layers": ctx.lm.info.num_layers, "heads": ctx.lm.info.num_heads,
        "wall_seconds": time.perf_counter() - wall, "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        **runner.provenance(),
    }


def collect(
    lm: LoadedModel,
    cells: Sequence[runner.Cell],
    samples: dict[tuple[str, int, int], Sequence[tasks.Sample]],
    path: Path,
    *,
    allow_mixed: bool = False,
    progress: bool = True,
) -> int:
    """Run the parts of ``cells`` missing from the store at ``path`` (``samples`` by task, length and seed);
    return how many ran. Interrupt at any time: a rerun goes on where it stopped."""
    from tqdm.auto import tqdm

    if any(c.seed == CALIBRATION_SEED for c in cells):
        raise HeadwiseError(f"seed {CALIBRATION_SEED} is the calibration seed: make training data on other seeds")
    store.repair(path)
    done = {r["key"] for r in store.read_records(path)}
    runner.check_versions(store.read_records(path), runner.LIBRARY, runner.fingerprint(), allow_mixed=allow_mixed)
    work = []
    for group, questions in samples.items():
        for context in runner.contexts(questions):
            digest = runner.context_digest(context)
            missing = [c for c in cells if (c.task, c.length, c.seed) == group
                       and c.part_key(context[0].context_id, digest) not in done]
            if missing:
                work.append((context, missing))
    bar = tqdm(total=sum(len(m) for _, m in work), desc="lookback data", unit="part", disable=not progress)
    for context, missing in work:
        ctx = runner.Context(lm, context)
        for cell in missing:
            bar.set_postfix_str(f"{ctx.id} {cell.method} {cell.ratio:g}")
            store.append_record(path, part_record(ctx, cell))
            bar.update(1)
    bar.close()
    return bar.n
