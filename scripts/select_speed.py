"""What decode-time selection buys in decoding speed: tokens per second over the same cache, full attention against
each selection rule, side by side in one process.

Usage::

    .venv/bin/python scripts/select_speed.py [--model smollm2-135m] [--lengths 4096,8000] [--tokens 32]
        [--rounds 3] [--rules quest:budget=256,quest:budget=1024,...] [--threads 1] [--out FILE.json]

For every length, one passkey context (seed 0, needle at depth 0.5) and its question are prefilled once into the
full cache. Then, for ``--rounds`` rounds, every configuration (full attention first, then each rule of
``--rules``, separated by ``;``) decodes ``--tokens`` greedy tokens from its own deep copy of that cache, read by
its rule (:meth:`headwise.cache.HeadwiseCache.read_by`); each round runs the configurations in turn, so that a
slower moment of the machine falls on all of them. Reported per configuration: the median decode tokens per
second, its ratio to full attention's in the same rounds (median and range), the fraction of the cache its steps
read (choosing included), whether its tokens equal full attention's, and the ceiling the bytes allow: a decoding
step of a small model also reads every weight, so a step can be at most ``(W + KV) / (W + f KV)`` faster, with W
the weight bytes, KV the cache bytes and f the read fraction.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from headwise.api import make_cache
from headwise.bench import protocol, runner
from headwise.bench.cli import split_list
from headwise.checks import check_output_file, set_threads
from headwise.compat import forward
from headwise.errors import HeadwiseError, run_cli
from headwise.generation import cache_bytes, prefill
from headwise.models import load_model
from headwise.report.html import write_atomic
from headwise.select import parse_selector
from headwise.specs import split

RULES = "quest:budget=256;quest:budget=1024;tokenselect:budget=256;recycled:budget=256"


def decode(lm, cache, first: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    """Greedy tokens after ``first`` (the prompt's last logits) and their tokens per second, steps timed only."""
    out, seconds, ids = first, 0.0, []
    with torch.no_grad():
        for _ in range(tokens):
            token = out.argmax(-1, keepdim=True)  # [1, 1]
            ids.append(int(token))
            start = time.perf_counter()
            out = forward(lm.model, cache, token).logits[:, -1]
            seconds += time.perf_counter() - start
    return tokens / seconds, ids


def measure(lm, length: int, rules: list[str], args: argparse.Namespace) -> dict:
    sample, ids = protocol.timing_prompt(lm, length)
    if len(ids) + args.tokens > lm.model.config.max_position_embeddings:
        raise HeadwiseError(f"{len(ids)} prompt tokens and {args.tokens} more exceed the model's context")
    cache = make_cache(lm.model, "full", prompt_length=len(ids))
    with torch.no_grad():
        first = prefill(lm.model, torch.tensor([ids]), cache)  # the last logits, [1, vocabulary]
    cache.seal()
    kv = cache_bytes(cache)
    weights = sum(p.nbytes for p in lm.model.parameters())
    configs = {"full": None, **{rule: parse_selector(rule) for rule in rules}}
    speeds: dict[str, list[float]] = {name: [] for name in configs}
    reads: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, rule in configs.items():
            copied = copy.deepcopy(cache)
            copied.read_by(rule)
            speed, outputs[name] = decode(lm, copied, first, args.tokens)
            speeds[name].append(speed)
            reads[name] = copied.read_fraction()
            del copied
    rows = []
    for name in configs:
        ratios = [s / f for s, f in zip(speeds[name], speeds["full"], strict=True)]
        rows.append({"config": name, "tokens_per_second": statistics.median(speeds[name]),
                     "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
                     "speedup_max": max(ratios), "read_fraction": reads[name],
                     "ceiling": (weights + kv) / (weights + reads[name] * kv),
                     "same_tokens_as_full": outputs[name] == outputs["full"],
                     "answer": lm.tokenizer.decode(outputs[name]).strip()})
    return {"length": length, "prompt_tokens": len(ids), "kv_bytes": kv, "weight_bytes": weights,
            "expected": sample.answers, "configs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="4096,8000", help="comma-separated context lengths in tokens")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rules", default=RULES, help="selection rules separated by ';' (full attention always runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.tokens < 1 or args.rounds < 1:
        raise HeadwiseError("--tokens and --rounds must be at least 1")
    rules = split(args.rules, parse_selector)  # a bad rule is refused before the model loads
    lengths = split_list(args.lengths, int, "length")
    set_threads(args.threads)
    if args.out:
        check_output_file(Path(args.out))
    lm = load_model(args.model)
    result = {"model": lm.name, "tokens": args.tokens, "rounds": args.rounds,
              "lengths": [measure(lm, n, rules, args) for n in lengths],
              **runner.provenance()}
    print("| context | config | tok/s | speed-up (median, range) | read | ceiling | same tokens as full |")
    print("|" + " --- |" * 7)
    for at in result["lengths"]:
        for row in at["configs"]:
            print(f"| {at['prompt_tokens']} | {row['config']} | {row['tokens_per_second']:.2f} "
                  f"| {row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) "
                  f"| {row['read_fraction']:.1%} | {row['ceiling']:.2f}x | {row['same_tokens_as_full']} |")
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "select_speed.py"))
