"""``headwise bench``: generate the tasks, run the sweep (resumable), print the table and write the report.

Output folder layout (``--out``, default ``runs/bench``): ``tasks/<task>-<length>-s<seed>.jsonl`` (the questions,
context by context, of the reported seed and of the calibration seed; also what peer runners read),
``results.jsonl`` (the results store, see :mod:`headwise.bench.store`), ``results.jsonl.gz`` (its compressed
copy, the one to commit; read when the store is absent, and restored from before a sweep resumes),
``report.html`` and the PNG plots.

A sweep first runs the calibration gate (:mod:`headwise.bench.calibration`), then every cell, one context at a
time; it prints the gate with the tables.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from headwise.bench.calibration import CALIBRATION_SEED
from headwise.bench.tasks import TASKS
from headwise.checks import add_dtype_option, add_threads_option, check_output_dir, check_output_file, set_threads
from headwise.errors import HeadwiseError
from headwise.registry import DEFAULT_MODEL

PRESET = {
    "methods": "streaming_llm,snapkv,tova",
    "ratios": "0.5,0.75,0.9",
    "tasks": "passkey,multikey,vartrack",
    "lengths": "1024,2048",
    "samples": 2,
}
RESULTS = "results.jsonl"


def split_list(text: str, convert: Callable[[str], object] = str, what: str = "value") -> list:
    """``"a,b"`` -> ``["a", "b"]`` converted with ``convert``; a clear error for a bad item."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [convert(t) for t in items]
    except ValueError as exc:
        raise HeadwiseError(f"bad {what} in '{text}': {exc}") from exc


def parse_method_options(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["snapkv:window=64"]`` -> ``{"snapkv": {"window": "64"}}``."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        method, colon, rest = item.partition(":")
        key, equals, value = rest.partition("=")
        if not (colon and equals and method and key):
            raise HeadwiseError(f"option '{item}' is not METHOD:KEY=VALUE")
        options.setdefault(method.strip(), {})[key.strip()] = value.strip()
    return options


def check_methods(methods: Sequence[str]) -> None:
    """Refuse unknown methods before anything runs."""
    try:
        from headwise.api import policy_names
        from headwise.select import SELECTORS
    except ImportError:
        known = ["full"]
    else:
        known = [*policy_names(), *SELECTORS]  # a selection rule runs as a method (runner.plan_arguments)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise HeadwiseError(f"unknown method(s) {', '.join(unknown)}: use one of {', '.join(known)}")


def check_tasks(names: Sequence[str]) -> None:
    """Refuse unknown task names before anything runs."""
    unknown = sorted(set(names) - set(TASKS))
    if unknown:
        raise HeadwiseError(f"unknown task(s) {', '.join(unknown)}: use one of {', '.join(TASKS)}")


def task_samples(lm, cells: Sequence, depths: Sequence[float]) -> dict[tuple[str, int, int], list]:
    """The samples of every (task, length, seed) that ``cells`` need, generated once each; a length beyond
    ``lm``'s context is refused."""
    from headwise.bench import tasks

    too_long = sorted({c.length for c in cells if c.length > lm.info.context_length})
    if too_long:
        raise HeadwiseError(f"length(s) {too_long} exceed {lm.name}'s context of {lm.info.context_length} tokens")
    count = tasks.token_counter(lm.tokenizer)
    wanted = {(c.task, c.length, c.seed): c.n_samples for c in cells}
    return {(t, n, seed): tasks.generate(t, n, contexts, seed, count, tokenizer_name=lm.name, depths=depths)
            for (t, n, seed), contexts in wanted.items()}


def run_sweep(args: argparse.Namespace, out: Path) -> None:
    """Check every option, load the model, write the task files, and run the parts missing from the store."""
    from headwise.bench import runner, store, tasks
    from headwise.models import load_model, resolve, resolve_dtype

    set_threads(args.threads)

    check_output_dir(out / "tasks")
    check_output_file(out / RESULTS)
    methods = split_list(args.methods, what="method")
    check_methods(methods)
    lengths = split_list(args.lengths, int, "length")
    task_names = split_list(args.tasks, what="task")
    check_tasks(task_names)
    depths = split_list(args.depths, float, "depth")
    cells = runner.plan_cells(
        resolve(args.model)[0], methods, split_list(args.ratios, float, "ratio"), task_names, lengths,
        protocols=["agnostic", "aware"] if args.protocol == "both" else [args.protocol], n_samples=args.samples,
        seed=args.seed, options=parse_method_options(args.option), chunk_size=args.chunk_size,
        calibration_seed=args.calibration_seed, calibration_samples=args.calibration_samples, sparse=args.sparse,
        act=args.act, dtype=resolve_dtype(args.dtype),
    )
    lm = load_model(args.model, dtype=args.dtype)
    samples = task_samples(lm, cells, depths)
    for (t, n, seed), group in samples.items():  # check every file before overwriting any
        tasks.check_unchanged(tasks.task_file(out / "tasks", t, n, seed), group)
    for (t, n, seed), group in samples.items():
        tasks.write_samples(tasks.task_file(out / "tasks", t, n, seed), group)
    if args.tasks_only:
        print(f"wrote {len(samples)} task files to {out / 'tasks'}")
        return
    results = out / RESULTS
    try:
        runner.sweep(lm, cells, lambda t, n, seed: samples[(t, n, seed)], results, progress=not args.no_progress,
                     allow_mixed=args.allow_mixed_versions, share_prefill=not args.direct_prefill)
    finally:  # an interrupted sweep keeps its compressed copy in step with what it finished
        store.pack(results)


def once_per_part(records: Sequence[dict]) -> list[dict]:
    """The records with each part key kept once (the first), so a part found in several stores (a sweep split
    over processes, a baseline rerun) is not counted twice; records without a key are all kept."""
    seen: set[str] = set()
    kept = []
    for r in records:
        key = r.get("key")
        if key is None or key not in seen:
            kept.append(r)
            if key is not None:
                seen.add(key)
    return kept


def cmd_bench(args: argparse.Namespace) -> None:
    from headwise.bench.store import read_records
    from headwise.report.bench_report import build_report, harmonize, markdown_report, terminal_table

    out = check_output_dir(Path(args.out))
    if not args.report_only:
        run_sweep(args, out)
        if args.tasks_only:
            return
    records = [harmonize(r) for r in read_records(out / RESULTS)]
    for extra in args.include:
        if not Path(extra).exists():
            raise HeadwiseError(f"results store '{extra}' does not exist")
        records += [harmonize(r) for r in read_records(Path(extra))]
    records = once_per_part(records)
    if not records:
        raise HeadwiseError(f"no results in {out / RESULTS}; run `headwise bench` without --report-only first")
    if args.markdown:
        print(markdown_report(records))
    else:
        print(terminal_table(records))  # it opens with the calibration gate
    print(f"report: {build_report(records, out)}")


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark compression methods on long-context tasks (score, memory, time)")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--methods", default=PRESET["methods"],
                   help="comma-separated policies, or selection rules (quest, tokenselect, recycled, roles: the whole "
                        "cache, each decoding step reading 1 - ratio of it); full is always run")
    p.add_argument("--ratios", default=PRESET["ratios"], help="comma-separated fractions of the context KV removed")
    p.add_argument("--tasks", default=PRESET["tasks"],
                   help=f"comma-separated tasks: {', '.join(TASKS)}")
    p.add_argument("--lengths", default=PRESET["lengths"], help="comma-separated target lengths in tokens")
    p.add_argument("--samples", type=int, default=PRESET["samples"],
                   help="contexts per task and length (each holds several questions)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, cycled over the contexts")
    p.add_argument("--seed", type=int, default=0, help="seed of the reported tasks")
    p.add_argument("--calibration-seed", type=int, default=CALIBRATION_SEED,
                   help=f"seed of the calibration gate's tasks, never reported (default {CALIBRATION_SEED})")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="contexts per task and length of the calibration gate (default: --samples)")
    p.add_argument("--protocol", default="agnostic", choices=["agnostic", "aware", "both"],
                   help="compress the context before the question (agnostic, default) or with it (aware)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a policy or plan option for one method of --methods, e.g. -o snapkv:window=32")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill the context in chunks of this many tokens")
    p.add_argument("--sparse", action="append", default=[], metavar="PATTERN[:KEY=VALUE,...]|PLAN.json",
                   help="also run the full cache and every method with this sparse prefill (repeatable; see "
                        "`headwise policies` and `headwise sparse-plan`); each answer is measured against the dense "
                        "full cache's")
    p.add_argument("--act", action="append", default=[], metavar="PROFILE.json[:beta=B,threshold=T]",
                   help="also run the full cache and every method with ACT attention-sink calibration of the "
                        "profile's sink heads (repeatable; default beta 0.4, threshold 0.1); each answer is measured "
                        "against the uncalibrated full cache's; methods built from a dense prefill (kvzip) and "
                        "selection rules are refused")
    add_threads_option(p)
    add_dtype_option(p)
    p.add_argument("--out", default="runs/bench", help="output folder (tasks, results.jsonl, report)")
    p.add_argument("--direct-prefill", action="store_true",
                   help="prefill every cell on its own instead of sharing one dense prefill per context (the same "
                   "results, slower: to measure what sharing saves)")
    p.add_argument("--allow-mixed-versions", action="store_true",
                   help="add to a store that holds results of other code or versions")
    p.add_argument("--report-only", action="store_true", help="rebuild the table and report from the results store")
    p.add_argument("--tasks-only", action="store_true", help="only write the task JSONL files (for peer runners)")
    p.add_argument("--include", action="append", default=[], metavar="RESULTS.jsonl[.gz]",
                   help="another results store to put in the report: a peer library's, or headwise's from another "
                   "--out (repeatable)")
    p.add_argument("--markdown", action="store_true",
                   help="print the Markdown report (gate, headline with intervals, fidelity, per-task tables, "
                   "costs; for BENCHMARKS.md) instead of the terminal table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
