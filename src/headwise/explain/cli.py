"""The explain subcommands: ``headwise lookback``, ``headwise attribute`` and ``headwise heads``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from headwise.bench.cli import check_methods, parse_method_options, split_list
from headwise.checks import add_dtype_option, add_threads_option, check_output_dir, check_output_file, set_threads
from headwise.errors import HeadwiseError
from headwise.registry import DEFAULT_MODEL

#: The lookback data store inside ``headwise lookback collect --out``.
LOOKBACK_DATA = "lookback.jsonl"


def cmd_lookback_collect(args: argparse.Namespace) -> None:
    from headwise.bench import runner, store, tasks
    from headwise.models import load_model, resolve, resolve_dtype

    out = check_output_dir(Path(args.out))
    path = check_output_file(out / LOOKBACK_DATA)
    methods = split_list(args.methods, what="method")
    check_methods(methods)
    task_names = split_list(args.tasks, what="task")
    unknown = sorted(set(task_names) - set(tasks.TASKS))
    if unknown:
        raise HeadwiseError(f"unknown task(s) {', '.join(unknown)}: use one of {', '.join(tasks.TASKS)}")
    lengths = split_list(args.lengths, int, "length")
    depths = split_list(args.depths, float, "depth")
    cells = [cell for seed in split_list(args.seeds, int, "seed") for cell in runner.plan_cells(
        resolve(args.model)[0], methods, split_list(args.ratios, float, "ratio"), task_names, lengths,
        n_samples=args.samples, seed=seed, options=parse_method_options(args.option), calibration_seed=None,
        dtype=resolve_dtype(args.dtype))]
    set_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    too_long = [n for n in lengths if n > lm.info.context_length]
    if too_long:
        raise HeadwiseError(f"length(s) {too_long} exceed {lm.name}'s context of {lm.info.context_length} tokens")
    from headwise.explain.collect import collect

    count = tasks.token_counter(lm.tokenizer)
    wanted = {(c.task, c.length, c.seed): c.n_samples for c in cells}
    samples = {(t, n, seed): tasks.generate(t, n, contexts, seed, count, tokenizer_name=lm.name, depths=depths)
               for (t, n, seed), contexts in wanted.items()}
    store.unpack(path)
    try:
        ran = collect(lm, cells, samples, path, allow_mixed=args.allow_mixed_versions, progress=not args.no_progress)
    finally:
        store.pack(path)
    print(f"{ran} parts run; store {path} (and {store.packed(path).name}, to commit)")


def cmd_lookback_train(args: argparse.Namespace) -> None:
    from headwise.explain.training import evaluate, load_dataset, markdown, train_probe

    out = check_output_file(Path(args.out))
    if args.strength <= 0:
        raise HeadwiseError(f"--strength must be positive, got {args.strength}")
    roles = None
    if args.profile is not None:
        from headwise.profile.schema import HeadProfile

        roles = HeadProfile.load(args.profile).roles
    data = load_dataset([Path(p) for p in args.data])
    heldout = split_list(args.heldout, what="task")
    figures = evaluate(data, heldout, strength=args.strength, roles=roles)
    probe = train_probe(data, heldout, strength=args.strength, report=figures)
    probe.save(out)
    print(markdown(figures))
    print(f"wrote {out} ({data.model}, {data.layers} x {data.heads} heads, trained on "
          f"{', '.join(figures['train_tasks'])})", file=sys.stderr)


def spans(ratios, span: int) -> list[tuple[int, int]]:
    """Row ranges of consecutive spans of at most ``span`` generation steps."""
    return [(start, min(start + span, len(ratios))) for start in range(0, len(ratios), span)]


def cmd_lookback_score(args: argparse.Namespace) -> None:
    from headwise.cli import check_needs_policy, read_prompt
    from headwise.explain.probe import Probe

    if args.span < 1:
        raise HeadwiseError(f"--span must be at least 1 token, got {args.span}")
    if not 0 < args.threshold < 1:
        raise HeadwiseError(f"--threshold must lie in (0, 1), got {args.threshold}")
    check_needs_policy(args)
    probe = Probe.load(Path(args.probe))
    text = read_prompt(args)
    from headwise.api import make_cache, make_plan

    if args.policy is not None:
        make_plan(args.policy, ratio=args.ratio, budget=args.budget, options=args.option)
    import torch

    from headwise.explain.lookback import forced_ratios, traced_answer
    from headwise.generation import build_prompt, check_length, prefill
    from headwise.models import load_model

    set_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    if (lm.info.num_layers, lm.info.num_heads) != (probe.layers, probe.heads) or lm.name != probe.model:
        raise HeadwiseError(f"the probe was trained on {probe.model}, not {lm.name}")
    ids = build_prompt(lm, text, chat=False if args.no_chat else None)
    check_length(ids, lm.info.context_length, args.max_new_tokens)
    context, tail = ids[:-1], ids[-1:]
    cache = make_cache(lm.model, args.policy or "full", ratio=args.ratio, budget=args.budget, options=args.option,
                       prompt_length=len(context))
    prefill(lm.model, torch.tensor([context]), cache)
    cache.seal()
    if args.answer is not None:
        tokens = lm.tokenizer(args.answer, add_special_tokens=False)["input_ids"]
        if len(tokens) < 2:
            raise HeadwiseError("--answer needs at least two tokens: the first is predicted before any is generated")
        ratios = forced_ratios(lm, cache, tail, tokens)
    else:
        traced = traced_answer(lm, cache, tail, args.max_new_tokens)
        tokens, ratios = traced.tokens, traced.ratios
    if not len(ratios):
        raise HeadwiseError("the answer has a single token: no generation step to read a lookback ratio from")
    whole = float(probe.probability(ratios.mean(dim=0).numpy()))
    rows = []
    for start, stop in spans(ratios, args.span):  # row k is the step that generated token k + 1
        first = 0 if start == 0 else start + 1
        p = float(probe.probability(ratios[start:stop].mean(dim=0).numpy()))
        rows.append({"tokens": [first, stop + 1], "text": lm.tokenizer.decode(tokens[first : stop + 1]),
                     "p_unsupported": p, "flagged": p >= args.threshold})
    answer = lm.tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"answer": answer, "p_unsupported": whole, "spans": rows}, ensure_ascii=False))
        return
    print(f"answer: {answer}")
    print(f"P(unsupported) of the whole answer: {whole:.3f}{'  FLAGGED' if whole >= args.threshold else ''}")
    for row in rows:
        flag = "FLAGGED" if row["flagged"] else "ok"
        print(f"  tokens {row['tokens'][0]}-{row['tokens'][1] - 1}: {row['p_unsupported']:.3f} {flag}  "
              f"{row['text']!r}")


def add_lookback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lookback", help="lookback ratios: make labelled data, train the hallucination probe, score "
                       "an answer (Lookback Lens)")
    steps = p.add_subparsers(dest="step", required=True)
    c = steps.add_parser("collect", help="labelled generations from the calibrated benchmark tasks (resumable)",
                         description="Answers every question of the tasks on the full cache and on compressed ones, "
                         "recording each head's lookback ratio; an answer is labelled supported when its first "
                         "clause occurs in the context (headwise.explain.labels).")
    c.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    c.add_argument("--tasks", default="passkey,multikey,vartrack,qa",
                   help="comma-separated tasks (default: the four SmolLM2's full cache passes)")
    c.add_argument("--lengths", default="2048", help="comma-separated target lengths in tokens (default 2048)")
    c.add_argument("--samples", type=int, default=8, help="contexts per task, length and seed (default 8)")
    c.add_argument("--seeds", default="0,1",
                   help="comma-separated task seeds, never the calibration seed (default 0,1)")
    c.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, cycled over the contexts")
    c.add_argument("--methods", default="streaming_llm,snapkv,tova",
                   help="comma-separated policies besides the full cache (always run)")
    c.add_argument("--ratios", default="0.5,0.75,0.9", help="comma-separated fractions of the context KV removed")
    c.add_argument("--option", "-o", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a policy option for one method, e.g. -o headwise:profile=profile.json")
    c.add_argument("--out", required=True, help=f"output folder ({LOOKBACK_DATA} and its .gz)")
    c.add_argument("--allow-mixed-versions", action="store_true", help="add to a store of other code or versions")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(c)
    add_dtype_option(c)
    c.set_defaults(func=cmd_lookback_collect)
    t = steps.add_parser("train", help="fit the logistic-regression probe and report its AUROC",
                         description="Fits on the tasks not held out; reports the cross-validated AUROC (folds keep "
                         "contexts together) and the AUROC on each held-out task, with 95%% intervals; writes JSON.")
    t.add_argument("--data", action="append", required=True, metavar="LOOKBACK.jsonl[.gz]",
                   help="labelled generations from `headwise lookback collect` (repeatable)")
    t.add_argument("--heldout", default="qa", help="comma-separated task kinds kept out of training (default qa)")
    t.add_argument("--strength", type=float, default=1.0,
                   help="inverse L2 regularisation, scikit-learn's C (default 1)")
    t.add_argument("--profile", default=None, help="a head profile: also report the probe on its retrieval heads")
    t.add_argument("--out", required=True, help="the probe file to write (JSON)")
    t.set_defaults(func=cmd_lookback_train)
    s = steps.add_parser("score", help="answer a prompt (or take --answer) and flag the spans the probe calls "
                         "unsupported")
    s.add_argument("prompt", nargs="?", help="prompt text, or - for stdin")
    s.add_argument("--file", "-f", help="read the prompt from this file")
    s.add_argument("--probe", required=True, help="probe.json from `headwise lookback train`")
    s.add_argument("--answer", default=None, help="score this answer (teacher-forced) instead of generating one")
    s.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    s.add_argument("--max-new-tokens", "-n", type=int, default=64)
    s.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    s.add_argument("--policy", default=None, help="answer from a compressed cache (see `headwise policies`)")
    s.add_argument("--ratio", type=float, default=None, help="fraction of the prompt's KV cache to remove")
    s.add_argument("--budget", type=int, default=None, help="KV tokens to keep per head (instead of --ratio)")
    s.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="policy option")
    s.add_argument("--span", type=int, default=8, help="generation steps per scored span (default 8, the paper's)")
    s.add_argument("--threshold", type=float, default=0.5, help="flag spans at or above this probability")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_threads_option(s)
    add_dtype_option(s)
    s.set_defaults(func=cmd_lookback_score, mode=None, profile=None)


#: Each adds one subcommand to the ``headwise`` parser (see :data:`headwise.cli.COMMANDS`).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_lookback]
