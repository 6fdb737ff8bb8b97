"""Do bfloat16 answers match float32's? Paired differences of score, answer NLL and top-1 agreement between two
bench stores of the same tasks run in two precisions (``scripts/sweep.sh precision``).

Usage::

    .venv/bin/python scripts/precision_match.py [--base results/precision/smollm2-135m-2048-float32]
        [--other results/precision/smollm2-135m-2048-bfloat16] [--tasks multikey,passkey,qa,vartrack]
        [--out results/precision/match-2048.json]

Every answer of a method and ratio in ``--other`` is paired with the same question's answer in ``--base``
(reported seed only, not the calibration gate). Per method and ratio: the mean score of each precision with its
95% bootstrap interval and the paired difference (other minus base), the share of answers whose text is the
same in both, over ``--tasks`` (the gate-passing tasks;
clustered by context, stratified by task, the mean of task means as in the bench's headline); and the mean answer
NLL above each precision's own full cache and top-1 agreement with it, as the bench stores them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from headwise.bench.cli import split_list
from headwise.bench.intervals import bootstrap_mean, excludes_zero, paired_difference
from headwise.bench.store import read_records
from headwise.checks import check_output_file
from headwise.errors import HeadwiseError, run_cli
from headwise.report.html import write_atomic


def answers(folder: Path, tasks: list[str]) -> dict[tuple, dict]:
    """The reported answers of a store by (method, ratio, question id), each with its task and context."""
    store = folder / "results.jsonl"
    if not store.exists() and not store.with_suffix(".jsonl.gz").exists():
        raise HeadwiseError(f"no results store in {folder}")
    rows = {}
    for record in read_records(store):
        if record.get("calibration") or record["task"] not in tasks or record.get("options"):
            continue
        for row in record["samples"]:
            rows[record["method"], record["ratio"], row["id"]] = {**row, "task": record["task"],
                                                                    "dtype": record.get("dtype", "float32")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base", default="results/precision/smollm2-135m-2048-float32")
    parser.add_argument("--other", default="results/precision/smollm2-135m-2048-bfloat16")
    parser.add_argument("--tasks", default="multikey,passkey,qa,vartrack")
    parser.add_argument("--out", default=None, help="also write the table to this JSON file")
    args = parser.parse_args()
    tasks = split_list(args.tasks, str, "task")
    if args.out:
        check_output_file(Path(args.out))
    base, other = answers(Path(args.base), tasks), answers(Path(args.other), tasks)
    settings = sorted({(m, r) for m, r, _ in other})
    table = []
    for method, ratio in settings:
        keys = sorted(k for k in other if k[:2] == (method, ratio) and k in base)
        if not keys:
            continue
        a, b = [other[k]["score"] for k in keys], [base[k]["score"] for k in keys]
        clusters, strata = [base[k]["context_id"] for k in keys], [base[k]["task"] for k in keys]
        diff = paired_difference(a, b, clusters, strata)
        table.append({
            "method": method, "ratio": ratio, "answers": len(keys),
            "dtypes": [base[keys[0]]["dtype"], other[keys[0]]["dtype"]],
            "base": bootstrap_mean(b, clusters, strata)._asdict(),
            "other": bootstrap_mean(a, clusters, strata)._asdict(),
            "difference": diff._asdict(), "differs": excludes_zero(diff),
            "same_output": sum(other[k]["output"] == base[k]["output"] for k in keys) / len(keys),
            "nll_above_full": [sum(d[k]["nll"] - d[k]["nll_full"] for k in keys) / len(keys) for d in (base, other)],
            "top1": [sum(d[k]["top1"] for k in keys) / len(keys) for d in (base, other)],
        })
    if not table:
        raise HeadwiseError("the two stores share no answers of the reported seed on these tasks")
    names = table[0]["dtypes"]
    print(f"| method | ratio | answers | {names[0]} [95% CI] | {names[1]} [95% CI] | {names[1]} - {names[0]} [95% CI] "
          f"| same answer text | NLL above own full ({names[0]} / {names[1]}) | top-1 ({names[0]} / {names[1]}) |")
    print("|" + " --- |" * 9)
    def cell(i: dict, sign: str = "") -> str:
        return f"{i['mean']:{sign}.3f} [{i['lo']:{sign}.3f}, {i['hi']:{sign}.3f}]"

    for row in table:
        print(f"| {row['method']} | {row['ratio']:g} | {row['answers']} | {cell(row['base'])} | {cell(row['other'])} "
              f"| {cell(row['difference'], '+')} | {row['same_output']:.1%} "
              f"| {row['nll_above_full'][0]:.3f} / {row['nll_above_full'][1]:.3f} "
              f"| {row['top1'][0]:.3f} / {row['top1'][1]:.3f} |")
    if args.out:
        write_atomic(Path(args.out), json.dumps({"base": args.base, "other": args.other, "tasks": tasks,
                                                 "table": table}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "precision_match.py"))
