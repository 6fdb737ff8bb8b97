"""``headwise sparse-plan``: write a sparse prefill plan (one pattern per KV head) from a head profile."""

from __future__ import annotations

import argparse
from pathlib import Path

from headwise.sparse.plan import ROLE_PATTERNS


def cmd_sparse_plan(args: argparse.Namespace) -> None:
    from headwise.checks import check_output_file
    from headwise.profile.schema import HeadProfile
    from headwise.report.html import write_atomic
    from headwise.sparse.plan import SparsePlan, plan_from_profile, plan_text, resolve

    out = check_output_file(Path(args.out))
    profile = HeadProfile.load(args.profile)
    patterns = {kind: getattr(args, kind) for kind in ROLE_PATTERNS}
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
    for kind, default in ROLE_PATTERNS.items():
        p.add_argument(f"--{kind}", default=default, metavar="PATTERN[:KEY=VALUE,...]",
                       help=f"the pattern of {kind} heads (default {default}; 'dense' for the dense path)")
    p.add_argument("--retrieval-threshold", type=float, default=0.1,
                   help="a KV head whose retrieval score reaches this is a retrieval head (default 0.1)")
    p.set_defaults(func=cmd_sparse_plan)
