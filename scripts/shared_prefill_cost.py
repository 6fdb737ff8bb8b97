"""What one shared dense prefill saves a sweep: seconds per answer with and without it, side by side in one run.

Usage::

    .venv/bin/python scripts/shared_prefill_cost.py [--model smollm2-135m] [--task passkey] [--length 2048]
        [--contexts 2] [--methods streaming_llm,snapkv,tova,knorm] [--ratios 0.5,0.75,0.9] [--out FILE.json]

For every context, the same parts (the full cache, then every method x ratio) run twice in one process: first
each cache by its own prefill (the direct path, what every sweep did before), then every cache built from one
dense prefill of the context (:mod:`headwise.dense`, what ``headwise bench`` does now). Both answer every question
of the context. The script checks that both give the same answers and fidelity, and reports the wall seconds per
answer of each and their ratio. One torch thread by default, as the sweeps run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from headwise.bench import runner, tasks
from headwise.bench.cli import split_list
from headwise.checks import check_output_file, set_threads
from headwise.errors import run_cli
from headwise.models import load_model
from headwise.report.html import write_atomic


def run_context(ctx: runner.Context, cells: list[runner.Cell]) -> tuple[float, list[dict]]:
    """Wall seconds and records of every cell on one context (the full cell first: it gives the references)."""
    references: dict[str, runner.Reference] = {}
    start = time.perf_counter()
    records = [runner.run_part(ctx, cell, references) for cell in cells]
    return time.perf_counter() - start, records


def same_answers(a: list[dict], b: list[dict]) -> bool:
    """Whether two runs of the same parts gave the same answer tokens, scores and fidelity."""
    fields = ("answer_ids", "score", "nll", "top1")
    rows = [[tuple(str(row[f]) for f in fields) for r in run for row in r["samples"]] for run in (a, b)]
    return rows[0] == rows[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="passkey", choices=tasks.TASKS)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--contexts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="streaming_llm,snapkv,tova,knorm")
    parser.add_argument("--ratios", default="0.5,0.75,0.9")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.out:
        check_output_file(Path(args.out))
    cells = runner.plan_cells(args.model, split_list(args.methods, what="method"),
                              split_list(args.ratios, float, "ratio"), [args.task], [args.length],
                              n_samples=args.contexts, seed=args.seed, calibration_seed=None)
    lm = load_model(args.model)
    questions = tasks.generate(args.task, args.length, args.contexts, args.seed, tasks.token_counter(lm.tokenizer),
                               tokenizer_name=lm.name)
    seconds = {"direct": 0.0, "shared": 0.0}
    identical = True
    answers = 0
    for group in runner.contexts(questions):
        direct, direct_records = run_context(runner.Context(lm, group, share_prefill=False), cells)
        shared, shared_records = run_context(runner.Context(lm, group), cells)
        seconds["direct"] += direct
        seconds["shared"] += shared
        identical &= same_answers(direct_records, shared_records)
        answers += sum(len(r["samples"]) for r in shared_records)
    result = {
        "model": lm.name, "task": args.task, "length": args.length, "contexts": args.contexts, "cells": len(cells),
        "answers": answers, "seconds_direct": seconds["direct"], "seconds_shared": seconds["shared"],
        "seconds_per_answer_direct": seconds["direct"] / answers,
        "seconds_per_answer_shared": seconds["shared"] / answers,
        "speedup": seconds["direct"] / seconds["shared"], "identical_answers": identical,
        "versions": runner.versions(), "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
    }
    print(f"{lm.name}, {args.task} at {args.length} tokens, {args.contexts} contexts x {len(cells)} cells = {answers} "
          f"answers each way, {torch.get_num_threads()} thread(s)")
    print(f"  direct (a prefill per cell): {result['seconds_per_answer_direct']:.2f} s per answer")
    print(f"  shared (one dense prefill):  {result['seconds_per_answer_shared']:.2f} s per answer")
    print(f"  {result['speedup']:.2f}x; identical answers and fidelity: {'yes' if identical else 'NO'}")
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "shared_prefill_cost.py"))
