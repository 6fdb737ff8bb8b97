"""The ``headwise profile`` subcommand."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from headwise.checks import add_dtype_option, add_threads_option
from headwise.registry import DEFAULT_MODEL


def cmd_profile(args: argparse.Namespace) -> None:
    from headwise.capture.stats import CaptureSettings
    from headwise.checks import check_output_dir, set_threads
    from headwise.errors import HeadwiseError
    from headwise.models import load_model
    from headwise.profile.metrics import ROLES
    from headwise.profile.profiler import ProfileSettings, profile_model
    from headwise.profile.report import write_outputs

    try:
        windows = tuple(sorted({int(w) for w in args.windows.split(",") if w.strip()}))
    except ValueError:
        raise HeadwiseError(f"--windows takes comma-separated integers, got '{args.windows}'") from None
    settings = ProfileSettings(length=args.length, repeat_length=min(args.length, 1024), runs=args.runs, seed=args.seed,
                               capture=CaptureSettings(windows=windows))
    out = check_output_dir(Path(args.out))
    start = time.perf_counter()
    set_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    result = profile_model(lm, settings, progress=not args.quiet)
    paths = write_outputs(result, out)
    profile = result.profile
    counts = {role: sum(r == role for row in profile.roles for r in row) for role in ROLES}
    runs = profile.retrieval_runs
    print(f"{lm.name}: {profile.num_layers} layers x {profile.num_heads} heads; roles "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"needle runs correct: {runs['passed']}/{runs['runs']}; total {time.perf_counter() - start:.1f} s")
    print(f"wrote {paths['profile']}, {paths['report']} and {len(paths) - 2} heatmaps", file=sys.stderr)


def add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure what each attention head does and write profile.json + HTML report")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model name or path (default {DEFAULT_MODEL})")
    p.add_argument("--length", type=int, default=2048, help="tokens per calibration input (default 2048)")
    p.add_argument("--runs", type=int, default=4, help="needle-in-a-haystack runs for retrieval scores (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration inputs (default 0)")
    p.add_argument("--windows", default="16,64,256,1024",
                   help="recent-window sizes (keys) of the locality metrics, comma-separated; must include 256, "
                        "the window that decides the 'local' role (default 16,64,256,1024)")
    p.add_argument("--out", "-o", default="profile", help="output folder (default ./profile)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_threads_option(p)
    add_dtype_option(p)
    p.set_defaults(func=cmd_profile)
