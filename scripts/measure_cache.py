"""Measure what the compressed cache saves on a real model: KV bytes, peak prefill memory, time overhead.

Usage::

    .venv/bin/python scripts/measure_cache.py [--model smollm2-135m] [--tokens 4000] [--out results/cache.json]

Each memory figure comes from a fresh subprocess (so one run's allocations cannot hide another's peak),
sampling the resident set size every 2 ms (headwise.memory.PeakRSS) and reporting the peak above the level
after the model was loaded and one short warm-up forward ran. The subprocesses set glibc's
``MALLOC_MMAP_THRESHOLD_`` to 64 KiB so that freed tensors go back to the OS and the resident size follows
the live tensors rather than the allocator's high-water mark. Times are the best of ``--repeats`` prefills
in one process after a warm-up, the caches interleaved, with ``--threads`` torch threads (default 1).
The prompt is real text (Python's own reference documentation, ``pydoc_data.topics``), cut to ``--tokens``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import torch
from transformers import DynamicCache

from headwise.api import make_cache
from headwise.checks import check_output_file, set_threads
from headwise.errors import run_cli
from headwise.generation import cache_bytes, prefill
from headwise.memory import PeakRSS
from headwise.models import load_model
from headwise.report.html import write_atomic


def prompt_ids(lm, tokens: int) -> torch.Tensor:
    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = lm.tokenizer(text)["input_ids"][:tokens]
    return torch.tensor([ids])


def build_cache(lm, name: str):
    """'dynamic' is transformers' DynamicCache; 'POLICY@RATIO' a headwise cache."""
    if name == "dynamic":
        lm.model.set_attn_implementation("sdpa")
        return DynamicCache(config=lm.model.config)
    policy, _, ratio = name.partition("@")
    return make_cache(lm.model, policy, ratio=float(ratio) if ratio else None)


def one_memory_run(model: str, tokens: int, cache_name: str, chunk: int | None) -> dict:
    """Peak RSS of one prefill, run in this (fresh) process."""
    lm = load_model(model)
    ids = prompt_ids(lm, tokens)
    cache = build_cache(lm, cache_name)
    # Warm-up: the first forward allocates one-time buffers (thread pools, kernels' scratch) that are not
    # the prefill's cost; measure after it.
    prefill(lm.model, ids[:, :64], build_cache(lm, cache_name))
    with PeakRSS() as peak:
        prefill(lm.model, ids, cache, chunk_size=chunk)
    return {"cache": cache_name, "chunk": chunk, "peak_delta_bytes": peak.delta, "kv_bytes": cache_bytes(cache)}


def time_prefills(lm, ids: torch.Tensor, names: list[str], repeats: int) -> dict[str, float]:
    """Best prefill seconds per cache, the caches interleaved so that a change of load hits all alike."""
    for name in names:
        prefill(lm.model, ids[:, :256], build_cache(lm, name))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            cache = build_cache(lm, name)
            start = time.perf_counter()
            prefill(lm.model, ids, cache)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timings (default 1)")
    parser.add_argument("--out", type=Path, default=Path("results/cache.json"))
    parser.add_argument("--memory-run", nargs=2, metavar=("CACHE", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_run:
        cache_name, chunk = args.memory_run
        print(json.dumps(one_memory_run(args.model, args.tokens, cache_name, int(chunk) or None)))
        return

    check_output_file(args.out)
    lm = load_model(args.model)
    ids = prompt_ids(lm, args.tokens)
    report: dict = {
        "model": lm.name, "tokens": ids.shape[1], "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "command": " ".join(sys.argv),
    }

    full = DynamicCache(config=lm.model.config)
    prefill(lm.model, ids, full)
    report["kv_bytes"] = {"full": cache_bytes(full)}
    for policy in ("knorm", "snapkv"):
        for ratio in (0.5, 0.75, 0.9):
            cache = make_cache(lm.model, policy, ratio=ratio)
            prefill(lm.model, ids, cache)
            held = cache_bytes(cache)
            report["kv_bytes"][f"{policy}@{ratio}"] = {
                "bytes": held, "fraction_of_full": held / report["kv_bytes"]["full"], "target": 1 - ratio,
                "metadata_bytes": cache.metadata_bytes(),
            }
            print(f"{policy} ratio {ratio}: {held / 2**20:.2f} MiB = {held / report['kv_bytes']['full']:.4f} of full")

    report["peak_memory"] = []
    for cache_name, chunk in (("dynamic", 0), ("dynamic", args.chunk), ("snapkv@0.75", args.chunk),
                              ("snapkv@0.9", args.chunk), ("snapkv@0.75", 0)):
        out = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
             "--memory-run", cache_name, str(chunk)],
            check=True, capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        ).stdout.strip().splitlines()[-1]
        row = json.loads(out)
        report["peak_memory"].append(row)
        peak_mib, kv_mib = row["peak_delta_bytes"] / 2**20, row["kv_bytes"] / 2**20
        print(f"peak above model: {cache_name:12s} chunk {chunk or 'none':>5}: {peak_mib:8.1f} MiB "
              f"(KV after: {kv_mib:.1f} MiB)")

    set_threads(args.threads)
    report["prefill_seconds"] = time_prefills(lm, ids, ["dynamic", "full", "snapkv@0.5", "knorm@0.5"], args.repeats)
    for name, seconds in report["prefill_seconds"].items():
        print(f"prefill {name:12s}: {seconds:.2f} s")
    write_atomic(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, "measure_cache.py"))
