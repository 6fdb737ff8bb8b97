"""Peak memory and time of the explain tools at several lengths: attention rollout and the head view must stay
linear in the length (issue 18), where one layer's full attention maps alone would grow with its square.

Usage::

    .venv/bin/python scripts/explain_memory.py [--model smollm2-135m] [--lengths 2048,4096,8192] [--threads 1]
        [--out results/explain/memory.json]

Each measurement runs in a fresh process (spawned), so a freed allocation of an earlier one cannot hide a peak:
the model is loaded, the prompt built (the benchmark's timing prompt: a passkey context of the length, needle at
depth 0.5, with its question), then :class:`headwise.memory.PeakRSS` records the peak resident memory above the
level after loading while one tool runs. Three tools per length: a plain forward pass of the prompt (what any
use of the model costs), rollout of the prompt's next token (:func:`headwise.explain.rollout.attribute`; an
answer would add its few tokens) and the head view with four query positions
(:func:`headwise.explain.headview.head_view`); nothing else runs in the process before, so every peak is measured
from the same level. Reported with each:
its seconds, and the bytes per token of the peak, which stay flat when memory is linear; for scale, the float32
attention maps of one layer (``heads x n x n``) are given too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

from headwise.bench.cli import split_list
from headwise.checks import check_output_file
from headwise.errors import run_cli

TOOLS = ("forward", "rollout", "head view")


def measure(model: str, length: int, tool: str, threads: int) -> dict:
    """One tool on one prompt, in this (fresh) process: its peak RSS above the loaded model, and its seconds."""
    import torch

    from headwise.bench.protocol import timing_prompt
    from headwise.explain.headview import head_view
    from headwise.explain.rollout import attribute
    from headwise.memory import PeakRSS
    from headwise.models import load_model

    torch.set_num_threads(threads)
    lm = load_model(model)
    _, ids = timing_prompt(lm, length)
    start = time.perf_counter()
    with PeakRSS() as mem, torch.inference_mode():
        if tool == "forward":
            lm.model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        elif tool == "rollout":
            attribute(lm, ids)
        else:
            head_view(lm, ids)
    return {"tool": tool, "length": len(ids), "peak_bytes": mem.delta, "seconds": time.perf_counter() - start,
            "layers": lm.info.num_layers, "heads": lm.info.num_heads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/explain/memory.json")
    args = p.parse_args()
    out = check_output_file(Path(args.out))
    lengths = split_list(args.lengths, int, "length")
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for length in lengths:
        for tool in TOOLS:
            with spawn.Pool(1) as pool:
                row = pool.apply(measure, (args.model, length, tool, args.threads))
            row["bytes_per_token"] = row["peak_bytes"] / row["length"]
            row["one_layer_maps_bytes"] = 4 * row["heads"] * row["length"] ** 2
            rows.append(row)
            print(f"{tool:>9} at {row['length']:>5} tokens: peak +{row['peak_bytes'] / 2**20:7.1f} MiB "
                  f"({row['bytes_per_token'] / 1024:.1f} KiB/token), {row['seconds']:.1f} s")
    from headwise.bench.runner import provenance
    from headwise.report.html import write_atomic

    write_atomic(out, json.dumps({"model": args.model, "threads": args.threads, "rows": rows, **provenance()},
                                 indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "explain_memory"))
