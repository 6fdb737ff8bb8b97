"""The explain subcommands: ``headwise lookback``, ``headwise attribute`` and ``headwise heads``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from headwise.bench.cli import check_methods, check_tasks, parse_method_options, split_list, task_samples
from headwise.checks import add_dtype_option, add_threads_option, check_output_dir, check_output_file, set_threads
from headwise.errors import HeadwiseError
from headwise.registry import DEFAULT_MODEL

#: The lookback data store inside ``headwise lookback collect --out``.
LOOKBACK_DATA = "lookback.jsonl"


def cmd_lookback_collect(args: argparse.Namespace) -> None:
    from headwise.bench import runner, store
    from headwise.models import load_model, resolve, resolve_dtype

    out = check_output_dir(Path(args.out))
    path = check_output_file(out / LOOKBACK_DATA)
    methods = split_list(args.methods, what="method")
    check_methods(methods)
    task_names = split_list(args.tasks, what="task")
    check_tasks(task_names)
    lengths = split_list(args.lengths, int, "length")
    depths = split_list(args.depths, float, "depth")
    cells = [cell for seed in split_list(args.seeds, int, "seed") for cell in runner.plan_cells(
        resolve(args.model)[0], methods, split_list(args.ratios, float, "ratio"), task_names, lengths,
        n_samples=args.samples, seed=seed, options=parse_method_options(args.option), calibration_seed=None,
        dtype=resolve_dtype(args.dtype))]
    set_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    from headwise.explain.collect import collect

    samples = task_samples(lm, cells, depths)
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


def _integers(value: str, flag: str) -> list[int]:
    """Comma-separated integers (``-1`` allowed), or a one-line error naming ``flag``."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise HeadwiseError(f"{flag} takes comma-separated integers, got '{value}'") from None


def _read_text(path: str) -> str:
    """A UTF-8 text file with some text in it, or a one-line error."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise HeadwiseError(f"cannot read text file '{path}': {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise HeadwiseError(f"cannot read text file '{path}': it is not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise HeadwiseError(f"text file '{path}' is empty")
    return text


def cmd_heads(args: argparse.Namespace) -> None:
    from headwise.explain.headview import head_view
    from headwise.explain.headview_page import write_view
    from headwise.models import load_model

    out = check_output_dir(Path(args.out))
    queries = _integers(args.query, "--query") if args.query is not None else None
    layers = _integers(args.layers, "--layers") if args.layers is not None else None
    if args.max_points < 1:
        raise HeadwiseError(f"--max-points must be at least 1, got {args.max_points}")
    text = _read_text(args.file)
    set_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    ids = lm.tokenizer(text)["input_ids"]
    view = head_view(lm, ids, query_positions=queries, max_points=args.max_points, layers=layers)
    paths = write_view(view, out, args.file)
    print(f"{lm.name}: {view.length} tokens, {len(view.layers)} layers x {view.num_heads} heads, query positions "
          f"{', '.join(map(str, view.query_positions))}; {view.seconds:.1f} s")
    print(f"wrote {paths['html']} and {paths['json']}", file=sys.stderr)


def add_heads(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="per head: a 2-D map of its queries and keys, and what chosen tokens attend to "
                                     "(HTML page)")
    p.add_argument("--file", "-f", required=True, help="UTF-8 text to run the model on (no chat template)")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--query", default=None,
                   help="token positions whose attention the page shows, comma-separated, negative from the end "
                        "(default: the last token and 3 evenly spaced ones)")
    p.add_argument("--max-points", type=int, default=512,
                   help="tokens drawn per head in the query/key map, evenly spaced (default 512)")
    p.add_argument("--layers", default=None, help="layers to show, comma-separated (default all)")
    p.add_argument("--out", "-o", default="heads", help="output folder for heads.html and heads.json (default ./heads)")
    add_threads_option(p)
    add_dtype_option(p)
    p.set_defaults(func=cmd_heads)


COMMANDS.append(add_heads)


def cmd_attribute(args: argparse.Namespace) -> None:
    from headwise.cli import check_needs_policy, read_prompt

    out = check_output_file(Path(args.out))
    if args.max_new_tokens < 1 or args.top < 0:
        raise HeadwiseError("--max-new-tokens must be at least 1 and --top at least 0")
    check_needs_policy(args)
    retrieval = args.method == "retrieval"
    if retrieval != (args.head_profile is not None):
        raise HeadwiseError("--method retrieval needs --profile (the head profile that names the retrieval heads), "
                            "and only it takes one")
    if args.policy is not None and args.answer is not None and not retrieval:
        raise HeadwiseError("--policy compresses the cache an answer is generated with, and --answer generates none: "
                            "give one of them (or use --method retrieval, which reads the compressed cache)")
    heads = None
    if retrieval:
        from headwise.explain.retrieval import retrieval_heads
        from headwise.profile.schema import HeadProfile

        heads = retrieval_heads(HeadProfile.load(args.head_profile))
    text = read_prompt(args)
    if args.policy is not None:
        from headwise.api import make_plan

        make_plan(args.policy, ratio=args.ratio, budget=args.budget, options=args.option)
    from headwise.explain.attribution_page import write_attribution_page
    from headwise.explain.rollout import attribute, check_flow_length
    from headwise.generation import build_prompt, check_length, generate, prompt_room, stop_token_ids
    from headwise.models import load_model

    set_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    answer = None if args.answer is None else lm.tokenizer(args.answer, add_special_tokens=False)["input_ids"]
    if answer == []:
        raise HeadwiseError("--answer has no tokens")
    new_tokens = args.max_new_tokens if answer is None else len(answer)
    room = prompt_room(lm.info.context_length, new_tokens)
    ids = build_prompt(lm, text, chat=False if args.no_chat else None, max_tokens=room if args.truncate else None)
    check_length(ids, lm.info.context_length, new_tokens)
    if args.method == "flow":
        limit = "" if args.answer is not None else " at most, as --max-new-tokens sets"
        check_flow_length(len(ids) + new_tokens - 1,
                          f" (a {len(ids)}-token prompt and {new_tokens} answer tokens{limit})")
    if heads is not None:
        _attribute_by_heads(lm, ids, answer, heads, args, out)
        return
    note = "answer given (teacher-forced)"
    if answer is None:
        cache = None
        if args.policy is not None:
            from headwise.api import make_cache

            cache = make_cache(lm.model, args.policy, ratio=args.ratio, budget=args.budget, options=args.option,
                               prompt_length=len(ids))
        result = generate(lm, ids, max_new_tokens=args.max_new_tokens, cache=cache)
        stops = stop_token_ids(lm)
        answer = result.token_ids[:-1] if result.token_ids and result.token_ids[-1] in stops else result.token_ids
        note = f"answer generated greedily with {cache.describe() if cache is not None else 'the full cache'}"
    attribution = attribute(lm, ids, answer, method=args.method)
    note += f"; attributed with the full model ({lm.dtype})"
    write_attribution_page(attribution, out, note=note)
    print(f"answer: {attribution.answer}")
    print(f"{note}; {args.method} over {len(ids)} prompt tokens in {attribution.seconds:.1f} s; most relevant:")
    for i in attribution.top(args.top):
        print(f"  {i:6d} {attribution.relevance[i]:.4g} {attribution.tokens[i]!r}")
    print(f"wrote {out}", file=sys.stderr)


def _attribute_by_heads(lm, ids: list[int], answer: list[int] | None, heads: list[tuple[int, int]],
                        args: argparse.Namespace, out: Path) -> None:
    """``attribute --method retrieval``: the retrieval heads' attention over the cache the answer is made with."""
    from headwise.api import make_cache
    from headwise.explain.attribution_page import write_attribution_page
    from headwise.explain.retrieval import answer_and_attribute

    cache = make_cache(lm.model, args.policy or "full", ratio=args.ratio, budget=args.budget, options=args.option,
                       prompt_length=len(ids) - 1)
    attribution, held = answer_and_attribute(lm, ids, heads, cache, answer=answer, max_new_tokens=args.max_new_tokens)
    how = "given (teacher-forced)" if answer is not None else "generated greedily"
    evicted = sum(h == 0 for h in held)
    note = (f"answer {how} with {cache.describe()}; the attention of {len(heads)} retrieval heads "
            f"({', '.join(f'L{layer}h{head}' for layer, head in heads)}) over that cache; {evicted} prompt tokens "
            "evicted from all of them (struck through)")
    write_attribution_page(attribution, out, note=note, held=held)
    print(f"answer: {attribution.answer}")
    print(f"{note}; most relevant:")
    for i in attribution.top(args.top):
        print(f"  {i:6d} {attribution.relevance[i]:.4g} {attribution.tokens[i]!r}")
    print(f"wrote {out}", file=sys.stderr)


def add_attribute(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="attribute an answer to the prompt's tokens (the retrieval heads' attention, "
                       "attention rollout or flow) and show them highlighted in an HTML page",
                       description="retrieval: the attention of the profile's retrieval heads (Wu et al. 2024) from "
                       "the positions that predicted the answer, over the cache the answer is made with (compressed "
                       "with --policy; evicted tokens are struck through). rollout and flow (Abnar and Zuidema 2020): "
                       "every head of every layer, with the full model. Without --answer, an answer is generated "
                       "greedily first, from a compressed cache with --policy.")
    p.add_argument("prompt", nargs="?", help="prompt text, or - for stdin")
    p.add_argument("--file", "-f", help="read the prompt from this file")
    p.add_argument("--answer", default=None, help="attribute this answer (teacher-forced) instead of generating one")
    p.add_argument("--method", choices=["rollout", "flow", "retrieval"], default="rollout",
                   help="rollout (default; block by block, runs at 8K), flow (max-flow, at most 128 tokens) or "
                        "retrieval (the retrieval heads of --profile; runs at 8K, over the compressed cache)")
    p.add_argument("--profile", dest="head_profile", default=None,
                   help="head profile (from `headwise profile`) whose retrieval heads --method retrieval reads")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", "-n", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--truncate", action="store_true",
                   help="cut the start of a prompt text that is too long (the chat template stays whole)")
    p.add_argument("--policy", default=None, help="generate the answer from a compressed cache (see `headwise "
                   "policies`); rollout and flow then attribute it with the full model, retrieval over that cache")
    p.add_argument("--ratio", type=float, default=None, help="fraction of the prompt's KV cache to remove")
    p.add_argument("--budget", type=int, default=None, help="KV tokens to keep per head (instead of --ratio)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="policy option")
    p.add_argument("--top", type=int, default=10, help="most relevant tokens to print (default 10)")
    p.add_argument("--out", required=True, help="the HTML page to write")
    add_threads_option(p)
    add_dtype_option(p)
    p.set_defaults(func=cmd_attribute, mode=None, profile=None)


COMMANDS.append(add_attribute)
