"""Does an attribution method point at the needle? Ranks of the needle's tokens under the retrieval heads' attention
and under attention rollout, on the benchmark's calibrated passkey task with the full cache.

Usage::

    .venv/bin/python scripts/attribution_ranks.py [--length 2048] [--contexts 4] [--seed 0] [--threads 1]
        [--profile results/profiles/smollm2-135m/profile.json] [--out results/explain/attribution-ranks.json]

Each question of each context is answered greedily with the full cache; the answer (without its end token) is
attributed to the prompt by both methods (:func:`headwise.explain.retrieval.answer_and_attribute`,
:func:`headwise.explain.rollout.attribute`). For each answer: the rank (1 = most relevant) of the best-ranked token
of the asked needle (:func:`headwise.explain.needles.needle_positions`, every occurrence of the answer in the
context), the first token excluded from both rankings (an attention sink). Reported per method: the median rank,
the share of answers whose needle is ranked first and within the top 5, and the prompt length.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from headwise.api import make_cache
from headwise.bench import protocol, tasks
from headwise.bench.runner import contexts, provenance
from headwise.checks import check_output_file, set_threads
from headwise.errors import run_cli
from headwise.explain.needles import needle_positions
from headwise.explain.retrieval import answer_and_attribute, retrieval_heads
from headwise.explain.rollout import attribute
from headwise.models import load_model
from headwise.profile.schema import HeadProfile
from headwise.report.html import write_atomic


def best_rank(relevance: list[float], needle: list[int]) -> int:
    """1-based rank of the best-ranked needle position, position 0 (the sink) left out of the ranking."""
    order = sorted(range(1, len(relevance)), key=lambda i: -relevance[i])
    return 1 + min(order.index(p) for p in needle if p > 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", default="results/profiles/smollm2-135m/profile.json")
    p.add_argument("--out", default="results/explain/attribution-ranks.json")
    args = p.parse_args()
    out = check_output_file(Path(args.out))
    heads = retrieval_heads(HeadProfile.load(args.profile))
    set_threads(args.threads)
    lm = load_model(args.model, dtype="float32")
    samples = tasks.generate("passkey", args.length, args.contexts, args.seed, tasks.token_counter(lm.tokenizer),
                             tokenizer_name=lm.name)
    rows = []
    for questions in contexts(samples):
        for sample in questions:
            head, tail = protocol.prompt_parts(lm, sample)
            ids = head + tail
            by_heads, _ = answer_and_attribute(lm, ids, heads, make_cache(lm.model, "full"),
                                               max_new_tokens=sample.max_new_tokens)
            answer = lm.tokenizer(by_heads.answer, add_special_tokens=False)["input_ids"]
            rolled = attribute(lm, ids, answer)
            needle = needle_positions(lm, sample)
            rows.append({"id": sample.id, "answer": by_heads.answer, "answers": sample.answers, "prompt": len(ids),
                         "retrieval heads": best_rank(by_heads.relevance, needle),
                         "rollout": best_rank(rolled.relevance, needle)})
            print(f"{sample.id}: {by_heads.answer!r}; needle rank: retrieval heads {rows[-1]['retrieval heads']}, "
                  f"rollout {rows[-1]['rollout']} of {len(ids) - 1}")
    summary = {}
    for method in ("retrieval heads", "rollout"):
        ranks = [r[method] for r in rows]
        summary[method] = {"median_rank": statistics.median(ranks), "top1": sum(r == 1 for r in ranks) / len(ranks),
                           "top5": sum(r <= 5 for r in ranks) / len(ranks)}
        print(f"{method}: median rank {summary[method]['median_rank']}, first {summary[method]['top1']:.0%}, "
              f"top 5 {summary[method]['top5']:.0%} of {len(ranks)} answers")
    write_atomic(out, json.dumps({"model": lm.name, "length": args.length, "heads": heads, "summary": summary,
                                  "rows": rows, "torch_threads": torch.get_num_threads(), **provenance()},
                                 indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "attribution_ranks"))
