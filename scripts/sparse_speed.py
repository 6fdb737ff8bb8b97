"""What sparse prefill buys in time: attention and whole-prefill seconds of each pattern against headwise's dense
path and transformers' SDPA, side by side in one process.

Usage::

    .venv/bin/python scripts/sparse_speed.py [--model smollm2-135m] [--lengths 4096,8000] [--rounds 3]
        [--patterns "ashape;vertical_slash;mass;moba;PLAN.json"] [--threads 1] [--out FILE.json]

For every length, one passkey prompt (seed 0, needle at depth 0.5) and two measurements, each in ``--rounds``
rounds that run every configuration in turn, so that a slower moment of the machine falls on all of them:

- **Attention.** Every layer's queries, keys and values of that prompt are recorded once; then each configuration
  computes every layer's attention over them: ``sdpa`` (transformers' fused causal SDPA over all heads, as its
  ``sdpa`` attention runs), ``dense`` (headwise's cache path: one causal SDPA per KV head) and each pattern, whose
  time is split into choosing the blocks (its ``layout``) and computing them (the block-sparse kernel).
- **Prefill.** The whole prompt in one forward: transformers' DynamicCache with ``sdpa``, headwise's full cache
  (``dense``), and headwise's full cache with each pattern (``--sparse``).

Reported per configuration: the median seconds, the ratios to ``dense`` and to ``sdpa`` in the same rounds (median
and range), the fraction of the causal attention computed, and for prefill whether the next token equals the
dense prefill's and the largest difference of the last logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from headwise.api import make_cache
from headwise.bench import protocol, runner
from headwise.bench.cli import split_list
from headwise.checks import check_output_file, set_threads
from headwise.compat import forward
from headwise.errors import HeadwiseError, run_cli
from headwise.generation import prefill
from headwise.models import load_model
from headwise.report.html import write_atomic
from headwise.sparse import Pattern, parse_pattern
from headwise.sparse.blocks import block_sparse_attention, causal_layout, computed_work
from headwise.specs import split

PATTERNS = "ashape;vertical_slash;mass;moba"


@dataclass
class Recorder(Pattern):
    """Records each query group a prefill computes with, in order (layer by layer, KV head by KV head), and
    computes them densely: one block as long as the prompt."""

    name = "recorder"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.queries: list[torch.Tensor] = []

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        self.queries.append(query.clone())
        return causal_layout(query.shape[0], query.shape[1], query.shape[2], key.shape[2], self.block, offset)


def record(lm, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, its queries [1, Hq, n, d], keys and values [1, Hkv, n, d] on the prompt ``ids``."""
    recorder = Recorder(block=len(ids), min_length=0)
    cache = make_cache(lm.model, "full", sparse=recorder)
    with torch.no_grad():
        prefill(lm.model, torch.tensor([ids]), cache)
    layers, per_head = [], iter(recorder.queries)
    for layer in cache.compressed_layers:
        queries = [next(per_head) for _ in layer.heads]
        keys = torch.stack([head.keys for head in layer.heads], dim=1)
        values = torch.stack([head.values for head in layer.heads], dim=1)
        layers.append((torch.cat(queries, dim=1), keys, values))
    return layers


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def attention_round(layers, scale: float, name: str, pattern) -> tuple[float, float, int, int]:
    """Seconds choosing and computing every layer's attention by ``name`` (``sdpa``, ``dense`` or ``pattern``,
    a pattern or a plan, whose dense heads take the dense path), with the causal pairs computed and all of them."""
    choosing = computing = 0.0
    computed = causal = 0
    with torch.no_grad():
        for i, (query, key, value) in enumerate(layers):
            hq, hkv, n = query.shape[1], key.shape[1], key.shape[2]
            group = hq // hkv
            if name == "sdpa":
                computing += timed(lambda: F.scaled_dot_product_attention(
                    query, key, value, is_causal=True, scale=scale, enable_gqa=True))  # noqa: B023
                continue
            for h in range(hkv):
                q_h, k_h, v_h = query[:, h * group : (h + 1) * group], key[:, h : h + 1], value[:, h : h + 1]
                own = pattern.for_head(i, h) if pattern is not None else None
                if own is None:
                    computing += timed(lambda: F.scaled_dot_product_attention(
                        q_h, k_h, v_h, is_causal=True, scale=scale, enable_gqa=True))  # noqa: B023
                    done = total = n * (n + 1) // 2 * group
                else:
                    start = time.perf_counter()
                    layout = own.layout(q_h, k_h, 0)
                    choosing += time.perf_counter() - start
                    computing += timed(lambda: block_sparse_attention(
                        q_h, k_h, v_h, layout, own.block, scale, 0))  # noqa: B023
                    done, total = computed_work(layout, n, n, own.block, 0)
                computed, causal = computed + done, causal + total
    return choosing, computing, computed, causal


def ratios(seconds: dict[str, list[float]], name: str, base: str) -> dict:
    values = [base_s / s for s, base_s in zip(seconds[name], seconds[base], strict=True)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(lm, length: int, specs: list[str], args: argparse.Namespace) -> dict:
    ids = protocol.timing_prompt(lm, length)[1]
    if len(ids) > lm.model.config.max_position_embeddings:
        raise HeadwiseError(f"{len(ids)} prompt tokens exceed the model's context")
    layers = record(lm, ids)
    scale = layers[0][0].shape[-1] ** -0.5
    patterns = {spec: parse_pattern(spec) for spec in specs}
    names = ["sdpa", "dense", *specs]
    attention: dict[str, list[float]] = {name: [] for name in names}
    choosing: dict[str, list[float]] = {name: [] for name in names}
    fraction: dict[str, float] = {"sdpa": 1.0}
    for _ in range(args.rounds):
        for name in names:
            choose, compute, done, total = attention_round(layers, scale, name, patterns.get(name))
            fraction[name] = done / total if total else 1.0
            attention[name].append(choose + compute)
            choosing[name].append(choose)
    del layers
    prefill_s: dict[str, list[float]] = {name: [] for name in names}
    logits: dict[str, torch.Tensor] = {}
    prompt = torch.tensor([ids])
    for _ in range(args.rounds):
        for name in names:
            with torch.no_grad():
                if name == "sdpa":
                    lm.model.set_attn_implementation("sdpa")
                    cache = DynamicCache(config=lm.model.config)
                    start = time.perf_counter()
                    out = forward(lm.model, cache, prompt, logits_to_keep=1).logits[:, -1]  # as prefill() does
                else:
                    cache = make_cache(lm.model, "full", sparse=patterns.get(name))
                    start = time.perf_counter()
                    out = prefill(lm.model, prompt, cache)
                prefill_s[name].append(time.perf_counter() - start)
            logits[name] = out
            del cache
    rows = []
    for name in names:
        rows.append({
            "config": name, "computed_fraction": fraction[name],
            "attention_seconds": statistics.median(attention[name]),
            "choosing_seconds": statistics.median(choosing[name]),
            "attention_speedup_vs_dense": ratios(attention, name, "dense"),
            "attention_speedup_vs_sdpa": ratios(attention, name, "sdpa"),
            "prefill_seconds": statistics.median(prefill_s[name]),
            "prefill_speedup_vs_dense": ratios(prefill_s, name, "dense"),
            "prefill_speedup_vs_sdpa": ratios(prefill_s, name, "sdpa"),
            "same_next_token_as_dense": bool(logits[name].argmax() == logits["dense"].argmax()),
            "max_logit_difference": float((logits[name] - logits["dense"]).abs().max()),
        })
    return {"length": length, "prompt_tokens": len(ids), "configs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="4096,8000", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patterns", default=PATTERNS,
                        help="sparse patterns or plan files separated by ';' (sdpa and dense always run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.rounds < 1:
        raise HeadwiseError("--rounds must be at least 1")
    specs = split(args.patterns, parse_pattern)  # a bad pattern is refused before the model loads
    lengths = split_list(args.lengths, int, "length")
    set_threads(args.threads)
    if args.out:
        check_output_file(Path(args.out))
    lm = load_model(args.model)
    result = {"model": lm.name, "rounds": args.rounds, "lengths": [measure(lm, n, specs, args) for n in lengths],
              **runner.provenance()}
    print("| prompt | config | computed | attention s (choosing) | vs dense | vs sdpa | prefill s | vs dense "
          "| vs sdpa | next token as dense |")
    print("|" + " --- |" * 10)
    for at in result["lengths"]:
        for row in at["configs"]:
            a, p = row["attention_speedup_vs_dense"], row["prefill_speedup_vs_dense"]
            print(f"| {at['prompt_tokens']} | {row['config']} | {row['computed_fraction']:.1%} "
                  f"| {row['attention_seconds']:.2f} ({row['choosing_seconds']:.2f}) "
                  f"| {a['median']:.2f}x ({a['min']:.2f}-{a['max']:.2f}) "
                  f"| {row['attention_speedup_vs_sdpa']['median']:.2f}x | {row['prefill_seconds']:.2f} "
                  f"| {p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f}) "
                  f"| {row['prefill_speedup_vs_sdpa']['median']:.2f}x | {row['same_next_token_as_dense']} |")
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "sparse_speed.py"))
