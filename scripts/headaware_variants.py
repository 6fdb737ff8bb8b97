"""Variants of the head-aware policy on a dev seed, side by side on the same answers, to choose among.

Usage::

    .venv/bin/python scripts/headaware_variants.py --profile results/profiles/smollm2-135m/profile.json \\
        --variant base --variant compensate:compensate=true --variant whole12:whole=12 \\
        [--tasks passkey,multikey,vartrack,qa] [--length 2048] [--contexts 6] [--seed 1] [--ratios 0.75,0.9] \\
        [--store runs/headaware-dev/variants.jsonl] [--summary FILE.json] [--versus NAME]

A variant is ``NAME`` (the policy's defaults) or ``NAME:KEY=VALUE,...`` (options of the ``headwise`` policy;
``--profile`` is every variant's, unless it gives its own ``profile=FILE``). ``--also POLICY[:KEY=VALUE,...]`` runs
another policy beside them on the same answers (named as given; KVzip, say, as a yardstick). Each context is
prefilled once, densely, and every variant's cache at every ratio is built from that prefill, as ``headwise bench``
does for its methods (the same protocol, parts and fidelity, run by :func:`headwise.bench.runner.sweep`). The store
is resumable: rerun the same line to go on. The summary gives, per variant and ratio, the mean over the tasks' means
with its 95% bootstrap interval (whole contexts resampled within each task), and the paired difference with the
first variant (or with ``--versus NAME``, a variant or an ``--also`` policy) on the same answers; ``--summary-only``
prints it again from a store (or its committed ``.gz`` copy) with no model.

Choose on a dev seed (not the calibration seed 100, nor a reported seed), then report the chosen options with
``headwise bench`` on other seeds.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from headwise.bench import runner
from headwise.bench.cli import check_tasks, split_list, task_samples
from headwise.bench.intervals import bootstrap_mean, excludes_zero, paired_difference
from headwise.bench.store import read_records
from headwise.checks import check_output_file, set_threads
from headwise.errors import HeadwiseError, run_cli
from headwise.models import load_model
from headwise.report.html import write_atomic
from headwise.specs import parse_spec


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME`` or ``NAME:KEY=VALUE,...`` as (name, options)."""
    name, options = parse_spec("variant", text)
    if not name:
        raise HeadwiseError(f"variant '{text}' has no name")
    return name, options


def summarise(records: list[dict], names: list[str], versus: str) -> list[dict]:
    """Per variant and ratio: the mean of the task means with its interval, and the paired difference with
    ``versus`` (one of ``names``), over the answers both have."""
    scores: dict[tuple[str, float], dict[str, tuple[float, str, str]]] = defaultdict(dict)
    for r in records:
        for s in r["samples"]:
            scores[r["variant"], r["ratio"]][s["id"]] = (s["score"], r["context_id"], r["task"])
    rows = []
    for (name, ratio), got in sorted(scores.items(), key=lambda kv: (kv[0][1], names.index(kv[0][0]))):
        ids = sorted(got)
        row = {"variant": name, "ratio": ratio, "answers": len(ids),
               "score": bootstrap_mean([got[i][0] for i in ids], [got[i][1] for i in ids],
                                       [got[i][2] for i in ids])._asdict()}
        base = scores.get((versus, ratio), {})
        both = [i for i in ids if i in base]
        if name != versus and both:
            diff = paired_difference([got[i][0] for i in both], [base[i][0] for i in both],
                                     [got[i][1] for i in both], [got[i][2] for i in both])
            row["vs_first"] = {**diff._asdict(), "answers": len(both), "excludes_zero": excludes_zero(diff)}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", help="the head profile every variant plans from (needed to run)")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME[:KEY=VALUE,...]")
    parser.add_argument("--also", action="append", default=[], metavar="POLICY[:KEY=VALUE,...]",
                        help="another policy to run beside the variants, named as given (repeatable)")
    parser.add_argument("--tasks", default="passkey,multikey,vartrack,qa")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--contexts", type=int, default=6, help="contexts per task")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, cycled over the contexts")
    parser.add_argument("--seed", type=int, default=1, help="the dev seed")
    parser.add_argument("--ratios", default="0.75,0.9")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", default="runs/headaware-dev/variants.jsonl")
    parser.add_argument("--summary", default=None, help="also write the summary to this JSON file")
    parser.add_argument("--versus", default=None, metavar="NAME",
                        help="pair every other variant with this one (default: the first --variant)")
    parser.add_argument("--summary-only", action="store_true",
                        help="only print the summary of the store (or of its .gz copy), with no model and no run")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    others = [(text, *parse_spec("policy", text)) for text in args.also]  # (name, policy, options)
    names = [name for name, _ in variants] + [name for name, _, _ in others]
    if len(set(names)) != len(names):
        raise HeadwiseError(f"variant names repeat: {', '.join(names)}")
    if args.versus is not None and args.versus not in names:
        raise HeadwiseError(f"--versus {args.versus} is none of the variants: {', '.join(names)}")
    task_names = split_list(args.tasks, what="task")
    check_tasks(task_names)
    ratios = split_list(args.ratios, float, "ratio")
    store = Path(args.store)
    if args.summary:
        check_output_file(Path(args.summary))
    if args.summary_only:
        stored = {r["key"]: r for r in read_records(store)}
        if not stored:
            raise HeadwiseError(f"no records in {store} (nor in {store}.gz)")
    else:
        stored = run(args, variants, others, task_names, ratios, store)
    mine = [r for r in stored.values() if r["seed"] == args.seed and r["task"] in task_names]
    report(args, variants + [(name, options) for name, _, options in others], mine)


def run(args: argparse.Namespace, variants: list[tuple[str, dict[str, str]]],
        others: list[tuple[str, str, dict[str, str]]], task_names: list[str], ratios: list[float],
        store: Path) -> dict[str, dict]:
    """Run the parts missing from ``store`` (the variants, then the ``others`` policies); return every record of it
    by key."""
    store.parent.mkdir(parents=True, exist_ok=True)
    check_output_file(store)
    if not args.profile or not Path(args.profile).is_file():
        raise HeadwiseError(f"no profile at {args.profile}: give --profile FILE (from `headwise profile`)")
    set_threads(args.threads)
    cells: dict[str, tuple[str | None, runner.Cell]] = {}  # key -> (variant, cell); the full cache's variant: None
    runs = [(name, "headwise", {"profile": args.profile, **options}) for name, options in variants]
    for name, policy, options in runs + others:
        for cell in runner.plan_cells(args.model, [policy], ratios, task_names, [args.length],
                                      n_samples=args.contexts, seed=args.seed, calibration_seed=None,
                                      options={policy: options}):
            cells.setdefault(cell.key(), (None if cell.is_reference else name, cell))
    lm = load_model(args.model)
    samples = task_samples(lm, [c for _, c in cells.values()], split_list(args.depths, float, "depth"))
    label = runner.Peer(runner.LIBRARY, runner.fingerprint(), runner.provenance(),  # headwise's sweep, with the
                        lambda questions: runner.Context(lm, questions),  # variant's name added to each record
                        lambda ctx, cell, record: {"variant": cells[cell.key()][0]})
    runner.sweep(lm, [c for _, c in cells.values()], lambda *group: samples[group], store, peer=label)
    stored = {r["key"]: r for r in read_records(store)}
    return stored


def report(args: argparse.Namespace, variants: list[tuple[str, dict[str, str]]], records: list[dict]) -> None:
    """Print the summary of ``records`` (and write it to ``--summary``): the full cache's mean, then the variants'."""
    names = [name for name, _ in variants]
    versus = args.versus or names[0]
    rows = summarise([{**r, "variant": "full"} for r in records if r["method"] == "full"], ["full"], "full")
    rows += summarise([r for r in records if r.get("variant") in names], names, versus)
    for row in rows:
        s = row["score"]
        line = f"{row['variant']:>16} {row['ratio']:<5g} {s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"
        line += f" ({row['answers']})"
        if "vs_first" in row:
            d = row["vs_first"]
            line += f"  vs {versus}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            line += " *" if d["excludes_zero"] else ""
        print(line)
    if args.summary:
        first = records[0]  # the store's model, versions and code
        summary = {"rows": rows, "variants": dict(variants), "model": first["model"], "length": args.length,
                   "seed": args.seed, "versions": first["versions"], "fingerprint": first["fingerprint"]}
        write_atomic(Path(args.summary), json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "headaware_variants.py"))
