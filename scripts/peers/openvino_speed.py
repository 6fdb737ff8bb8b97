"""Dense and compressed speed side by side with OpenVINO GenAI, on the same prompts, interleaved, in one process.

Run it in the OpenVINO peer's venv (``bash scripts/peers/setup_openvino.sh`` makes it and the model's IR)::

    .venv-openvino/bin/python scripts/peers/openvino_speed.py [--lengths 1024,4096,8192] [--rounds 3]
        [--new-tokens 64] [--dtypes float32,bfloat16] [--ratios 0.5,0.75,0.9] [--policy snapkv]
        [--sparse "ashape;results/sparse/plan-smollm2-135m.json"] [--threads 2] [--out FILE.json]

For every length, one prompt of that many tokens (the benchmark's passkey task, seed 0, needle at depth 0.5,
question included) is prefilled whole and then decodes exactly ``--new-tokens`` greedy tokens (end-of-sequence
ignored) in every configuration, one after the other, ``--rounds`` times, so that a slower moment of the machine
falls on all of them:

- ``openvino``: OpenVINO GenAI's ``LLMPipeline`` on the model's IR (fp32 weights; the CPU plugin's default
  inference precision, bf16 on a CPU with native bf16, and its default KV-cache precision, both recorded), with
  the scheduler of ``openvino_sparse.py``: the whole prompt in one prefill step and no prefix caching, which would
  otherwise answer a prompt seen in an earlier round from its cache;
- ``headwise DTYPE``: headwise's full cache (its dense path) with the model in each of ``--dtypes``;
- ``headwise DTYPE POLICY RATIO``: the last of ``--dtypes``, with ``--policy`` removing each of ``--ratios`` of the
  prompt's KV cache at prefill, decoding from the compressed cache;
- ``headwise DTYPE PATTERN``: the last of ``--dtypes``, the full cache with each sparse prefill pattern or plan of
  ``--sparse``;
- ``transformers DTYPE``: transformers' own ``DynamicCache`` with its ``sdpa`` attention, the baseline headwise
  replaces, in each of ``--dtypes``.

Prefill seconds are headwise's prefill forward (the last position's logits only) and OpenVINO's time to the first
token; decode tokens per second are the steps after the first token over their seconds (OpenVINO: one over its
mean time per output token). Reported per configuration and length: the minimum, median and maximum over the
rounds, and the median of the per-round ratios to OpenVINO's figure of the same round. Both libraries run
``--threads`` threads. The versions (this venv's transformers runs headwise too) and the machine are recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai as ov_genai
import torch
from openvino_sparse import openvino_pipeline  # this folder is on the path of a script run from it
from transformers import DynamicCache

from headwise.api import make_cache, policy_names
from headwise.bench import protocol
from headwise.bench.cli import split_list
from headwise.checks import check_output_file, set_threads
from headwise.errors import HeadwiseError, run_cli
from headwise.generation import Sampling, decode, prefill
from headwise.models import LoadedModel, load_model, resolve_dtype
from headwise.report.html import write_atomic
from headwise.sparse import parse_pattern
from headwise.specs import split


def run_openvino(pipe: ov_genai.LLMPipeline, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens per second) of ``new_tokens`` greedy tokens after the prompt ``ids``."""
    array = np.array([ids], dtype=np.int64)
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = new_tokens
    config.ignore_eos = True
    config.do_sample = False
    result = pipe.generate(ov_genai.TokenizedInputs(ov.Tensor(array), ov.Tensor(np.ones_like(array))), config)
    metrics = result.perf_metrics
    return metrics.get_ttft().mean / 1000, 1000 / metrics.get_tpot().mean


def run_torch(lm: LoadedModel, cache, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of ``new_tokens`` greedy tokens from ``cache``."""
    with torch.inference_mode():
        start = time.perf_counter()
        logits = prefill(lm.model, torch.tensor([ids]), cache)
        prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        tokens = decode(lm.model, logits, cache, max_new_tokens=new_tokens, sampling=Sampling(), stop_ids=set())
        seconds = time.perf_counter() - start
    return prefill_seconds, (len(tokens) - 1) / seconds


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="1024,4096,8192", help="comma-separated prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded after each prompt")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="headwise's precisions (the last one also "
                        "runs the compressed caches)")
    parser.add_argument("--ratios", default="0.5,0.75,0.9", help="fractions of the KV cache removed ('' for none)")
    parser.add_argument("--policy", default="snapkv", help="the compression policy of the compressed caches")
    parser.add_argument("--sparse", default="", help="headwise sparse prefill patterns or plan files, ';'-separated")
    parser.add_argument("--threads", type=int, default=2, help="threads of both libraries")
    parser.add_argument("--out", default=None, help="also write every measurement to this JSON file")
    args = parser.parse_args()
    if args.rounds < 1 or args.new_tokens < 2:
        raise HeadwiseError("--rounds must be at least 1 and --new-tokens at least 2")
    lengths = split_list(args.lengths, int, "length")
    dtypes = [resolve_dtype(d) for d in split_list(args.dtypes, str, "dtype")]
    ratios = split_list(args.ratios, float, "ratio") if args.ratios else []
    if args.policy not in policy_names():
        raise HeadwiseError(f"unknown policy '{args.policy}': use one of {', '.join(policy_names())}")
    patterns = {spec: parse_pattern(spec) for spec in split(args.sparse, parse_pattern)} if args.sparse else {}
    if args.out:
        check_output_file(Path(args.out))
    set_threads(args.threads)
    models = {dtype: load_model(args.model, dtype=dtype) for dtype in dtypes}
    lm = models[dtypes[-1]]
    too_long = [n for n in lengths if n > lm.info.context_length]
    if too_long:
        raise HeadwiseError(f"length(s) {too_long} exceed {lm.name}'s context of {lm.info.context_length} tokens")
    ir = Path(f"{lm.model.name_or_path}-openvino")
    if not (ir / "openvino_model.xml").exists():
        raise HeadwiseError(f"no OpenVINO IR at {ir}: run bash scripts/peers/setup_openvino.sh")
    pipe = openvino_pipeline(ir, "dense", args.threads)
    core = ov.Core()
    openvino_settings = {name: str(core.get_property("CPU", name))
                         for name in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION")}

    configs = {"openvino": lambda ids: run_openvino(pipe, ids, args.new_tokens)}
    for dtype, m in models.items():
        configs[f"headwise {dtype}"] = lambda ids, m=m: run_torch(m, make_cache(m.model, "full"), ids,
                                                                   args.new_tokens)
    for ratio in ratios:
        configs[f"headwise {dtypes[-1]} {args.policy} {ratio:g}"] = lambda ids, r=ratio: run_torch(
            lm, make_cache(lm.model, args.policy, ratio=r), ids, args.new_tokens)
    for spec, pattern in patterns.items():
        configs[f"headwise {dtypes[-1]} {spec}"] = lambda ids, p=pattern: run_torch(
            lm, make_cache(lm.model, "full", sparse=p), ids, args.new_tokens)
    for dtype, m in models.items():
        def baseline(ids: list[int], m: LoadedModel = m) -> tuple[float, float]:
            m.model.set_attn_implementation("sdpa")  # make_cache selects headwise's; this is transformers' own
            return run_torch(m, DynamicCache(config=m.model.config), ids, args.new_tokens)
        configs[f"transformers {dtype}"] = baseline

    prompts = {length: protocol.timing_prompt(lm, length)[1] for length in lengths}
    for config in configs.values():  # a warm-up of every path, not measured
        config(prompts[lengths[0]])
    rows = []
    for length, ids in prompts.items():
        for round_ in range(args.rounds):
            for name, config in configs.items():
                prefill_seconds, tokens_per_second = config(ids)
                rows.append({"config": name, "length": length, "prompt_tokens": len(ids), "round": round_,
                             "prefill_seconds": prefill_seconds, "decode_tokens_per_second": tokens_per_second})
                print(f"{length} round {round_} {name}: prefill {prefill_seconds:.2f} s, "
                      f"decode {tokens_per_second:.1f} tok/s", flush=True)
    table = []
    for length in lengths:
        base = {r["round"]: r for r in rows if r["length"] == length and r["config"] == "openvino"}
        for name in configs:
            mine = [r for r in rows if r["length"] == length and r["config"] == name]
            table.append({
                "config": name, "length": length, "prompt_tokens": mine[0]["prompt_tokens"],
                "prefill_seconds": spread([r["prefill_seconds"] for r in mine]),
                "decode_tokens_per_second": spread([r["decode_tokens_per_second"] for r in mine]),
                "prefill_vs_openvino": statistics.median(r["prefill_seconds"] / base[r["round"]]["prefill_seconds"]
                                                         for r in mine),
                "decode_vs_openvino": statistics.median(r["decode_tokens_per_second"]
                                                        / base[r["round"]]["decode_tokens_per_second"] for r in mine),
            })
    print("| length | config | prefill s (min / median / max) | x OpenVINO's | decode tok/s (min / median / max) "
          "| x OpenVINO's |")
    print("|" + " --- |" * 6)
    for row in table:
        p, d = row["prefill_seconds"], row["decode_tokens_per_second"]
        print(f"| {row['prompt_tokens']} | {row['config']} | {p['min']:.2f} / {p['median']:.2f} / {p['max']:.2f} "
              f"| {row['prefill_vs_openvino']:.2f} | {d['min']:.1f} / {d['median']:.1f} / {d['max']:.1f} "
              f"| {row['decode_vs_openvino']:.2f} |")
    result = {"model": lm.name, "lengths": lengths, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "threads": args.threads, "policy": args.policy, "sparse": list(patterns), "openvino": openvino_settings,
              "summary": table,
              "measurements": rows,
              "versions": {name: version(name) for name in ("openvino", "openvino-genai", "torch", "transformers")},
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpu": platform.processor()}}
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "openvino_speed.py"))
