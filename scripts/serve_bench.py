"""What serving with a context cache buys: time to first token on a cache miss and a hit, the memory held by
cached documents, and a bounded load test, for each compression setting, measured against a real server.

Usage::

    .venv/bin/python scripts/serve_bench.py [--model smollm2-135m] [--length 4096] [--documents 10]
        [--requests 200] [--clients 4] [--policy snapkv] [--profile F] [--ratios 0,0.75] [--threads 1] [--llamacpp]
        [--out results/serve/serve-4096.json]

The documents are the benchmark's passkey contexts (:mod:`headwise.bench.tasks`, seed 0, needles at depths
0.5/0.7/0.9), each with its two questions; a document is the system message and a question the user message.
For each ratio (0 is the full cache) one ``headwise serve`` process runs on loopback (:mod:`headwise.serve.launch`):

1. every document is asked its first question (a miss: prefill and compress) and then its second (a hit),
   streamed, and the client times the first content chunk of each; both answers are scored as the benchmark does;
2. with every document cached, the server's ``context_cache_bytes`` (the tensors' bytes) and its resident set;
3. ``--requests`` greedy requests from ``--clients`` threads, round robin over documents and questions (all hits):
   throughput, latency percentiles, errors and the server's peak resident set.

Misses and hits of one ratio run interleaved in one process, so their ratio is a side-by-side measurement.
With ``--llamacpp``, llama-cpp-python's OpenAI server (``.venv-llamacpp``, ``scripts/peers/setup_llamacpp.sh``)
runs the same three steps on the model's own GGUF with its prompt cache; it has no context-cache metrics, so
its memory is its resident set only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from headwise.bench import runner, tasks
from headwise.bench.cli import split_list
from headwise.bench.scoring import score
from headwise.checks import check_output_file
from headwise.errors import HeadwiseError, run_cli
from headwise.models import load_model
from headwise.registry import REGISTRY
from headwise.report.html import write_atomic
from headwise.serve.launch import ServerProcess

NAME = "served"
DEPTHS = (0.5, 0.7, 0.9)


def messages(sample: tasks.Sample) -> list[dict[str, str]]:
    return [{"role": "system", "content": sample.context}, {"role": "user", "content": sample.question}]


def ask(client: openai.OpenAI, sample: tasks.Sample) -> tuple[float, float, str]:
    """Stream one question about its document: (seconds to the first content, seconds in all, answer text)."""
    start = time.perf_counter()
    first = None
    pieces = []
    stream = client.chat.completions.create(
        model=NAME, temperature=0, max_tokens=sample.max_new_tokens, stream=True, messages=messages(sample))
    for chunk in stream:
        text = chunk.choices[0].delta.content if chunk.choices else None
        if text:
            first = first if first is not None else time.perf_counter() - start
            pieces.append(text)
    total = time.perf_counter() - start
    return first if first is not None else total, total, "".join(pieces)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def llamacpp(args: argparse.Namespace) -> Callable[[int], list[str]]:
    """llama-cpp-python's OpenAI server on the model's own GGUF, with its prompt cache (a RAM cache of states)."""
    python = Path(__file__).resolve().parents[1] / ".venv-llamacpp" / "bin" / "python"
    if not python.exists():
        raise HeadwiseError("no .venv-llamacpp: run bash scripts/peers/setup_llamacpp.sh first")
    spec = REGISTRY.get(args.model)
    gguf = spec.locate_gguf() if spec else None
    if gguf is None:
        raise HeadwiseError(f"--llamacpp needs a registry model with a GGUF file, not '{args.model}'")
    return lambda port: [str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", NAME,
                         "--n_ctx", "8192", "--n_threads", str(args.threads), "--cache", "true",
                         "--host", "127.0.0.1", "--port", str(port)]


def measure(args: argparse.Namespace, ratio: float, documents: list[list[tasks.Sample]], *,
            program: Callable[[int], list[str]] | None = None) -> dict:
    """One server's figures; ``program`` runs another server instead of headwise's (no context-cache metrics)."""
    profile = ["--profile", args.profile] if args.profile else []
    compression = ["--policy", "full"] if ratio == 0 else ["--policy", args.policy, "--ratio", str(ratio), *profile]
    served = ["--model", args.model, "--served-name", NAME, *compression, "--cache-bytes", "64GiB",
              "--max-queue", str(args.clients * 2)]
    with ServerProcess(served, threads=args.threads, program=program,
                       ready="/v1/models" if program else "/health") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        idle = server.memory()
        rows = []
        for questions in documents:
            miss, hit = (ask(client, q) for q in questions[:2])
            rows.append({"context_id": questions[0].context_id, "ttft_miss": miss[0], "ttft_hit": hit[0],
                         "score_miss": score(questions[0].scoring, miss[2].strip(), questions[0].answers),
                         "score_hit": score(questions[1].scoring, hit[2].strip(), questions[1].answers)})
        if program is None and server.metric("context_cache_misses_total") != len(documents):
            raise HeadwiseError("the server missed its context cache more often than once per document")
        held = {"context_cache_bytes": server.metric("context_cache_bytes") if program is None else None,
                **server.memory(), "idle_rss": idle["rss"]}
        work = [documents[i % len(documents)][(i // len(documents)) % 2] for i in range(args.requests)]

        def one(sample: tasks.Sample) -> float | None:
            start = time.perf_counter()
            try:
                client.chat.completions.create(model=NAME, temperature=0, max_tokens=sample.max_new_tokens,
                                               messages=messages(sample))
            except openai.APIError:
                return None
            return time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = list(pool.map(one, work))
        wall = time.perf_counter() - start
        done = [s for s in latencies if s is not None]
        load = {"requests": len(work), "clients": args.clients, "errors": len(work) - len(done),
                "wall_seconds": wall, "requests_per_second": len(done) / wall,
                "p50_seconds": percentile(done, 50), "p95_seconds": percentile(done, 95),
                "peak_rss": server.memory()["peak_rss"]}
    ttft = {k: statistics.median(r[k] for r in rows) for k in ("ttft_miss", "ttft_hit")}
    name = "llama.cpp (GGUF, prompt cache)" if program else "full" if ratio == 0 else f"{args.policy} {ratio}"
    return {"server": name, "ratio": ratio, "policy": "full" if ratio == 0 else args.policy, "documents": rows,
            "median_ttft_miss": ttft["ttft_miss"], "median_ttft_hit": ttft["ttft_hit"],
            "miss_over_hit": ttft["ttft_miss"] / ttft["ttft_hit"],
            "score_miss": statistics.mean(r["score_miss"] for r in rows),
            "score_hit": statistics.mean(r["score_hit"] for r in rows), "held": held, "load": load}


def table(result: dict) -> str:
    lines = ["| server | TTFT miss (median) | TTFT hit | miss / hit | score miss, hit | held by contexts | server RSS "
             "| req/s | p50 | p95 | errors | peak RSS |", "|" + " --- |" * 12]
    for m in result["runs"]:
        h, ld = m["held"], m["load"]
        contexts = "-" if h["context_cache_bytes"] is None else f"{h['context_cache_bytes'] / 2**20:.1f} MiB"
        lines.append(
            f"| {m['server']} | {m['median_ttft_miss']:.2f} s | {m['median_ttft_hit']:.3f} s "
            f"| {m['miss_over_hit']:.0f}x "
            f"| {m['score_miss']:.2f}, {m['score_hit']:.2f} | {contexts} "
            f"| {h['rss'] / 2**20:.0f} MiB | {ld['requests_per_second']:.2f} | {ld['p50_seconds']:.2f} s "
            f"| {ld['p95_seconds']:.2f} s | {ld['errors']} | {ld['peak_rss'] / 2**20:.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096, help="document length in tokens")
    parser.add_argument("--documents", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200, help="requests of the load test")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the load test")
    parser.add_argument("--policy", default="snapkv", help="policy of the compressed runs")
    parser.add_argument("--profile", default=None, help="head profile of --policy headwise (from headwise profile)")
    parser.add_argument("--ratios", default="0,0.75", help="comma-separated ratios (0: the full cache)")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--llamacpp", action="store_true",
                        help="also run llama.cpp's server (.venv-llamacpp) on the model's GGUF, with its prompt cache")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    ratios = split_list(args.ratios, float, "ratio")
    if args.documents < 1 or args.requests < 1 or args.clients < 1:
        raise HeadwiseError("--documents, --requests and --clients must be at least 1")
    if args.out:
        check_output_file(Path(args.out))
    peer = llamacpp(args) if args.llamacpp else None
    lm = load_model(args.model)  # the documents are measured with the served model's tokenizer
    samples = tasks.generate("passkey", args.length, args.documents, 0, tasks.token_counter(lm.tokenizer),
                             tokenizer_name=lm.name, depths=DEPTHS)
    documents = [list(group) for group in runner.contexts(samples)]
    del lm
    result = {"model": args.model, "length": args.length, "documents": args.documents,
              "runs": [measure(args, ratio, documents) for ratio in ratios]
              + ([measure(args, 0.0, documents, program=peer)] if peer else []),
              "versions": runner.versions(), "machine": {"platform": platform.platform(), "threads": args.threads}}
    print(table(result))
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "serve_bench.py"))
