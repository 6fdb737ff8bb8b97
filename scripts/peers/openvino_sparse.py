"""Sparse prefill side by side with OpenVINO GenAI's (TriShape and XAttention), on the same prompts, in one run.

Run it in the OpenVINO peer's venv (``bash scripts/peers/setup_openvino.sh`` makes it and the model's IR)::

    .venv-openvino/bin/python scripts/peers/openvino_sparse.py [--length 4096] [--contexts 2]
        [--tasks passkey,multikey,vartrack,qa] [--patterns "mass;results/sparse/plan-smollm2-135m.json"]
        [--threads 1] [--out results/sparse/openvino-4096.json]

Each prompt is a question of the benchmark's calibrated tasks (headwise's own task builder and prompt, seed 0,
the first ``--contexts`` contexts of each task, every question of them), prefilled whole, question included, and
answered greedily by every configuration in turn: headwise's full cache with dense prefill and with each pattern
of ``--patterns``, and OpenVINO GenAI's continuous-batching pipeline on the model's IR (fp32 weights) with dense
attention, TriShape and XAttention (its default sparse settings). Prefill seconds are headwise's prefill forward
and OpenVINO's time to first token; both libraries run ``--threads`` threads. Reported per configuration: the
mean score with its 95% bootstrap interval (clustered by context, the mean of the task means), its paired
difference from the same library's dense prefill, and the median prefill seconds with the median and range of
the per-prompt speed-up over that dense prefill.
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

from headwise.api import make_cache
from headwise.bench import protocol, tasks
from headwise.bench.cli import split_list
from headwise.bench.intervals import bootstrap_mean, paired_difference
from headwise.bench.scoring import score
from headwise.checks import check_output_file, set_threads
from headwise.errors import HeadwiseError, run_cli
from headwise.generation import Sampling, decode, prefill, stop_token_ids
from headwise.models import load_model
from headwise.report.html import write_atomic
from headwise.sparse import parse_pattern
from headwise.specs import split

OPENVINO_MODES = ("dense", "TRISHAPE", "XATTENTION")
DEPTHS = {2048: (0.1, 0.5, 0.9), 4096: (0.5, 0.7, 0.9)}  # scripts/sweep.sh's needle depths


def scheduler_config(mode: str = "dense", eviction: ov_genai.CacheEvictionConfig | None = None,
                     blocks: int | None = None) -> ov_genai.SchedulerConfig:
    """The scheduler of every OpenVINO run here: the whole prompt in one prefill step, no prefix caching, dense
    attention or the sparse ``mode`` (its defaults), and ``eviction`` when given; ``blocks`` KV blocks, or 2 GB."""
    config = ov_genai.SchedulerConfig()
    if blocks:
        config.num_kv_blocks = blocks
    else:
        config.cache_size = 2  # GB of KV blocks: a few 8K prompts
    config.max_num_batched_tokens = 16384  # a whole prompt in one prefill step
    config.dynamic_split_fuse = False
    config.enable_prefix_caching = False  # a prompt run again must be prefilled again, to be timed
    if mode != "dense":
        config.use_sparse_attention = True
        sparse = ov_genai.SparseAttentionConfig()
        sparse.mode = getattr(ov_genai.SparseAttentionMode, mode)
        config.sparse_attention_config = sparse
    if eviction is not None:
        config.use_cache_eviction = True
        config.cache_eviction_config = eviction
    return config


def openvino_pipeline(ir: Path, mode: str, threads: int) -> ov_genai.LLMPipeline:
    """OpenVINO GenAI's pipeline on ``ir`` with dense attention or the sparse ``mode`` (its defaults)."""
    return ov_genai.LLMPipeline(str(ir), "CPU", scheduler_config=scheduler_config(mode), INFERENCE_NUM_THREADS=threads)


def greedy(max_new_tokens: int) -> ov_genai.GenerationConfig:
    """Greedy decoding of at most ``max_new_tokens``."""
    config = ov_genai.GenerationConfig()
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    return config


def run_openvino(pipe, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens for the prompt ``ids`` and the time to the first one."""
    array = np.array([ids], dtype=np.int64)
    config = greedy(max_new_tokens)
    result = pipe.generate(ov_genai.TokenizedInputs(ov.Tensor(array), ov.Tensor(np.ones_like(array))), config)
    return list(result.tokens[0]), result.perf_metrics.get_ttft().mean / 1000


def run_headwise(lm, pattern, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens for the prompt ``ids`` from headwise's full cache, prefilled densely or by ``pattern``, and
    the prefill seconds."""
    cache = make_cache(lm.model, "full", sparse=pattern)
    with torch.no_grad():
        start = time.perf_counter()
        logits = prefill(lm.model, torch.tensor([ids]), cache)
        seconds = time.perf_counter() - start
        tokens = decode(lm.model, logits, cache, max_new_tokens=max_new_tokens, sampling=Sampling(),
                        stop_ids=stop_token_ids(lm))
    return tokens, seconds


def summary(rows: list[dict], name: str, dense: str) -> dict:
    mine = [r for r in rows if r["config"] == name]
    base = {r["id"]: r for r in rows if r["config"] == dense}
    scores = [r["score"] for r in mine]
    clusters, strata = [r["context_id"] for r in mine], [r["task"] for r in mine]
    speedups = [base[r["id"]]["prefill_seconds"] / r["prefill_seconds"] for r in mine]
    interval = bootstrap_mean(scores, clusters, strata)
    out = {"config": name, "answers": len(mine), "score": interval._asdict(),
           "prefill_seconds": statistics.median(r["prefill_seconds"] for r in mine),
           "speedup": {"median": statistics.median(speedups), "min": min(speedups), "max": max(speedups)}}
    if name != dense:
        out["vs_dense"] = paired_difference(scores, [base[r["id"]]["score"] for r in mine], clusters,
                                            strata)._asdict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096, choices=sorted(DEPTHS))
    parser.add_argument("--contexts", type=int, default=2, help="contexts per task (each with its questions)")
    parser.add_argument("--tasks", default="passkey,multikey,vartrack,qa")
    parser.add_argument("--patterns", default="mass;results/sparse/plan-smollm2-135m.json",
                        help="headwise sparse patterns or plan files separated by ';' (dense always runs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the figures and every answer to this JSON file")
    args = parser.parse_args()
    if args.contexts < 1:
        raise HeadwiseError("--contexts must be at least 1")
    names = split_list(args.tasks, str, "task")
    unknown = sorted(set(names) - set(tasks.TASKS))
    if unknown:
        raise HeadwiseError(f"unknown task(s) {', '.join(unknown)}")
    patterns = {spec: parse_pattern(spec) for spec in split(args.patterns, parse_pattern)}
    if args.out:
        check_output_file(Path(args.out))
    set_threads(args.threads)
    lm = load_model(args.model)
    ir = Path(f"{lm.model.name_or_path}-openvino")
    if not (ir / "openvino_model.xml").exists():
        raise HeadwiseError(f"no OpenVINO IR at {ir}: run bash scripts/peers/setup_openvino.sh")
    pipes = {f"openvino {mode}": openvino_pipeline(ir, mode, args.threads) for mode in OPENVINO_MODES}
    headwise = {"headwise dense": None, **{f"headwise {spec}": p for spec, p in patterns.items()}}
    counter = tasks.token_counter(lm.tokenizer)
    rows = []
    for task in names:
        samples = tasks.generate(task, args.length, args.contexts, 0, counter, tokenizer_name=lm.name,
                                 depths=DEPTHS[args.length])
        for sample in samples:
            head, tail = protocol.prompt_parts(lm, sample)
            ids = head + tail
            for name in [*headwise, *pipes]:
                if name in pipes:
                    tokens, seconds = run_openvino(pipes[name], ids, sample.max_new_tokens)
                else:
                    tokens, seconds = run_headwise(lm, headwise[name], ids, sample.max_new_tokens)
                text = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                rows.append({"config": name, "id": sample.id, "context_id": sample.context_id, "task": task,
                             "prompt_tokens": len(ids), "prefill_seconds": seconds, "output": text,
                             "answers": sample.answers, "score": score(sample.scoring, text, sample.answers)})
                print(f"{sample.id} {name}: {seconds:.2f} s, score {rows[-1]['score']:g} ({text[:40]!r})", flush=True)
    table = [summary(rows, name, "headwise dense") for name in headwise]
    table += [summary(rows, name, "openvino dense") for name in pipes]
    print("| config | answers | score [95% CI] | vs own dense [95% CI] | prefill s | speed-up vs own dense |")
    print("|" + " --- |" * 6)
    for row in table:
        s, d, p = row["score"], row.get("vs_dense"), row["speedup"]
        versus = f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" if d else ""
        print(f"| {row['config']} | {row['answers']} | {s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] | {versus} "
              f"| {row['prefill_seconds']:.2f} | {p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f}) |")
    result = {"model": lm.name, "length": args.length, "tasks": names, "contexts": args.contexts,
              "threads": args.threads, "summary": table, "answers": rows,
              "versions": {name: version(name) for name in ("openvino", "openvino-genai", "torch", "transformers")},
              "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "openvino_sparse.py"))
