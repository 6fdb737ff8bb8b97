"""The ``headwise`` command line: one subcommand per stage of the loop.

Every subcommand turns a :class:`~headwise.errors.HeadwiseError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from headwise import __version__
from headwise.bench.cli import add_bench
from headwise.checks import add_dtype_option, add_threads_option
from headwise.errors import HeadwiseError, run_cli
from headwise.explain.cli import COMMANDS as EXPLAIN_COMMANDS
from headwise.profile.cli import add_profile
from headwise.registry import DEFAULT_MODEL, REGISTRY
from headwise.serve.cli import add_serve


def _utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeadwiseError(f"cannot read the prompt from {source}: it is not UTF-8 text ({exc})") from exc


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the positional argument, ``--file`` or stdin (``-``), as UTF-8 text."""
    if args.file is not None and args.prompt is not None:
        raise HeadwiseError("give the prompt either as an argument or with --file, not both")
    if args.file is not None:
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise HeadwiseError(f"cannot read prompt file '{args.file}': {exc}") from exc
        return _utf8(data, f"file '{args.file}'")
    if args.prompt is None or args.prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise HeadwiseError("no prompt: pass it as an argument, with --file, or on stdin")
        return _utf8(sys.stdin.buffer.read(), "stdin")
    return args.prompt


def cmd_models(args: argparse.Namespace) -> None:
    from headwise.registry import describe

    for name in REGISTRY:
        spec, installed, info = describe(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}: {spec.description}")
        if installed and info is not None:
            print(f"  installed; {info.summary()}")
            print(f"  layer types: {', '.join(sorted(set(info.layer_types)))}")
        else:
            print(f"  not installed: {spec.install}")


#: generate's arguments that only mean something with --policy (argparse dest names).
NEEDS_POLICY = ("ratio", "budget", "mode", "profile", "option")


def check_needs_policy(args: argparse.Namespace) -> None:
    """Refuse compression arguments given without ``--policy``: they would be ignored."""
    given = [f"--{name}" for name in NEEDS_POLICY if getattr(args, name) not in (None, [])]
    if args.policy is None and given:
        raise HeadwiseError(
            f"without --policy, {', '.join(given)} would be ignored: add --policy (see `headwise policies`)"
        )


def cmd_generate(args: argparse.Namespace) -> None:
    from headwise.checks import check_chunk_size, set_threads
    from headwise.generation import Sampling, build_prompt, check_length, generate, prompt_room
    from headwise.models import load_model

    text = read_prompt(args)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.max_new_tokens < 1:
        raise HeadwiseError("--max-new-tokens must be at least 1")
    check_chunk_size(args.chunk_size)
    check_needs_policy(args)
    set_threads(args.threads)
    mode = args.mode or "prefill"
    options = [*args.option, f"profile={args.profile}"] if args.profile else args.option
    if args.policy is not None:  # refuse bad compression arguments before the model loads
        from headwise.api import make_plan

        make_plan(args.policy, ratio=args.ratio, budget=args.budget, mode=mode, options=options, select=args.select,
                  sparse=args.sparse, act=args.act)
    elif args.select is not None or args.sparse is not None or args.act is not None:
        from headwise.api import make_plan

        make_plan("full", select=args.select, sparse=args.sparse, act=args.act)
    lm = load_model(args.model, dtype=args.dtype)
    room = prompt_room(lm.info.context_length, args.max_new_tokens)
    ids = build_prompt(lm, text, chat=False if args.no_chat else None, max_tokens=room if args.truncate else None)
    check_length(ids, lm.info.context_length, args.max_new_tokens)
    cache = None
    policy_note = "full cache"
    if args.policy is not None or args.select is not None or args.sparse is not None or args.act is not None:
        from headwise.api import make_cache

        cache = make_cache(
            lm.model, args.policy or "full", ratio=args.ratio, budget=args.budget, mode=mode,
            prompt_length=len(ids), options=options, select=args.select, sparse=args.sparse, act=args.act,
        )
        policy_note = cache.describe()
    result = generate(
        lm, ids, max_new_tokens=args.max_new_tokens, sampling=sampling, cache=cache,
        chunk_size=args.chunk_size, progress=not args.no_progress,
        on_token=lambda t: print(lm.tokenizer.decode([t], skip_special_tokens=True), end="", flush=True),
    )
    print()
    if args.select is not None:
        policy_note += f", decoding read {cache.read_fraction():.1%} of the cache"
    if args.sparse is not None:
        policy_note += f", prefill computed {cache.computed_fraction():.1%} of the causal attention"
    print(
        f"[{lm.name} {lm.dtype}, {policy_note}] prompt {result.prompt_tokens} tokens, "
        f"KV cache {result.kv_bytes / 2**20:.2f} MiB, prefill {result.prefill_seconds:.2f} s, "
        f"decode {result.decode_tokens_per_second:.1f} tokens/s",
        file=sys.stderr,
    )


def cmd_policies(args: argparse.Namespace) -> None:
    import dataclasses

    from headwise.api import PLAN_OPTIONS
    from headwise.policies import POLICIES

    for name, cls in POLICIES.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        options = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        print(f"{name}: {summary}")
        print(f"  options: {options or '(none)'}")
    print(f"plan options (any policy): {', '.join(PLAN_OPTIONS)}; see headwise.cache.Plan")
    from headwise.select import SELECTORS
    from headwise.sparse import PATTERNS

    for flag, registry in (("--select", SELECTORS), ("--sparse", PATTERNS)):
        for name, cls in registry.items():
            options = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
            print(f"{flag} {name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
            print(f"  options: {options}")
    print("--sparse PLAN.json: a pattern per KV head, from `headwise sparse-plan`")
    print("--act PROFILE.json[:beta=0.4,threshold=0.1]: ACT attention-sink calibration of the profile's sink heads")


#: The head kinds of :func:`headwise.policies.headwise.head_kinds`, each with its pattern in a sparse plan (their
#: defaults are :data:`headwise.sparse.plan.ROLE_PATTERNS`; not imported here, so the command line starts without
#: torch).
SPARSE_KINDS = ("streaming", "retrieval", "other")


def cmd_sparse_plan(args: argparse.Namespace) -> None:
    from headwise.checks import check_output_file
    from headwise.profile.schema import HeadProfile
    from headwise.report.html import write_atomic
    from headwise.sparse.plan import ROLE_PATTERNS, SparsePlan, plan_from_profile, plan_text, resolve

    out = check_output_file(Path(args.out))
    profile = HeadProfile.load(args.profile)
    patterns = {kind: getattr(args, kind) or default for kind, default in ROLE_PATTERNS.items()}
    plan = plan_from_profile(profile, patterns, args.retrieval_threshold)
    resolve(plan, "the plan")  # refuse a bad pattern before writing
    write_atomic(out, plan_text(plan))
    print(f"wrote {SparsePlan(str(out)).describe()}")


def add_sparse_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sparse-plan", help="write a sparse prefill plan (a pattern per KV head) from a head profile",
                       description="Each KV head's kind in the profile (streaming, retrieval, other) takes that "
                                   "kind's pattern; edit the file to change any head. Use it with --sparse FILE.")
    p.add_argument("--profile", required=True, help="profile.json from `headwise profile`")
    p.add_argument("--out", required=True, help="the plan file to write (JSON)")
    for kind in SPARSE_KINDS:
        p.add_argument(f"--{kind}", default=None, metavar="PATTERN[:KEY=VALUE,...]",
                       help=f"the pattern of {kind} heads ('dense' for the dense path; default: A-shape for streaming, "
                            "dense for retrieval, cumulative mass for the others)")
    p.add_argument("--retrieval-threshold", type=float, default=0.1,
                   help="a KV head whose retrieval score reaches this is a retrieval head (default 0.1)")
    p.set_defaults(func=cmd_sparse_plan)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, optionally with a compressed KV cache")
    p.add_argument("prompt", nargs="?", help="prompt text, or - for stdin")
    p.add_argument("--file", "-f", help="read the prompt from this file")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--max-new-tokens", "-n", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--truncate", action="store_true",
                   help="cut the start of a prompt text that is too long (the chat template stays whole)")
    p.add_argument("--chunk-size", type=int, default=None, help="prefill in chunks of this many tokens")
    p.add_argument("--policy", default=None, help="compression policy (see `headwise policies`)")
    p.add_argument("--ratio", type=float, default=None, help="fraction of the prompt's KV cache to remove, in [0, 1)")
    p.add_argument("--budget", type=int, default=None, help="KV tokens to keep per head (instead of --ratio)")
    p.add_argument("--mode", default=None, choices=["prefill", "decode"],
                   help="compress after each prefill chunk (prefill, default), or also keep the budget while decoding")
    p.add_argument("--profile", default=None, help="head profile for --policy headwise (from `headwise profile`)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="policy or plan option, e.g. -o window=64 -o schedule=pyramid")
    p.add_argument("--select", default=None, metavar="RULE[:KEY=VALUE,...]",
                   help="decode-time selection: each step reads only the pages the rule picks, e.g. "
                        "quest:budget=256 (see `headwise policies`); with or without --policy")
    p.add_argument("--sparse", default=None, metavar="PATTERN[:KEY=VALUE,...]|PLAN.json",
                   help="sparse prefill: each prefill forward computes only the attention blocks the pattern "
                        "selects, e.g. ashape:local_blocks=4 (see `headwise policies`), or a plan file from "
                        "`headwise sparse-plan` (PLAN.json); with or without --policy")
    p.add_argument("--act", default=None, metavar="PROFILE.json[:beta=B,threshold=T]",
                   help="ACT attention-sink calibration: in the heads the profile labels sink, attention to hidden "
                        "sinks found in the prompt (mean received above threshold, default 0.1; the first one left "
                        "alone) is scaled by beta (default 0.4) and given to the other keys; with or without "
                        "--policy, not with --select, --sparse or a policy that needs a dense prefill (kvzip)")
    add_threads_option(p)
    add_dtype_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar while the prompt is prefilled")
    p.set_defaults(func=cmd_generate)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_generate, add_profile, add_sparse_plan, add_bench, add_serve, *EXPLAIN_COMMANDS,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwise",
        description="Profile attention heads, compress the KV cache per head, benchmark it on long prompts, and "
        "serve compressed contexts.",
    )
    parser.add_argument("--version", action="version", version=f"headwise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list known models, their architecture and whether they are installed").set_defaults(
        func=cmd_models
    )
    sub.add_parser("policies", help="list compression policies and their options").set_defaults(func=cmd_policies)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_cli(lambda: args.func(args), "headwise")
    except KeyboardInterrupt:
        print("headwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
