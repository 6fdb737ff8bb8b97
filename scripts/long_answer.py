"""Long answers: how closely decode-mode eviction and decode-time selection follow the full cache's own
continuation over hundreds of generated tokens.

Usage::

    .venv/bin/python scripts/long_answer.py [--model smollm2-135m] [--length 2048] [--contexts 4]
        [--tokens 256] [--budget 256] [--configs "h2o;streaming_llm;quest;tokenselect;recycled"]
        [--threads 1] [--out FILE.json]

Each prompt is a passage of the benchmark's qa task (seed 0, the first ``--contexts`` contexts) followed by an
instruction to retell it, so the answer is long. The full cache answers greedily for ``--tokens`` tokens, end of
text ignored: that continuation is the reference. Every configuration then holds or reads ``--budget`` tokens per
KV head: a policy (``h2o``, ``streaming_llm``, any of ``headwise policies``) in decode mode, which compresses the
prompt to the budget and keeps it there at every generated token, or a selection rule (``quest``,
``tokenselect``, ``recycled``) over the whole cache, each step reading the budget (its recent window a quarter of
it). The reference is fed one token
at a time, as decoding runs, and scored: the NLL per token above the full cache's own and the fraction of tokens
that are the configuration's top choice, over all tokens and over the first and last quarters (does it drift?),
each with a 95% bootstrap interval clustered by context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from headwise.api import make_cache
from headwise.bench import protocol, runner, tasks
from headwise.bench.intervals import bootstrap_mean
from headwise.checks import check_output_file, set_threads
from headwise.compat import forward
from headwise.errors import HeadwiseError, run_cli
from headwise.generation import Sampling, decode, prefill
from headwise.models import load_model
from headwise.policies import POLICIES
from headwise.report.html import write_atomic
from headwise.select import SELECTORS

INSTRUCTION = "Retell the passage above in detail, in your own words."


def build(lm, name: str, budget: int, prompt_length: int):
    """The cache of a configuration: a policy in decode mode at ``budget`` tokens, or a rule reading ``budget``."""
    if name == "full":
        return make_cache(lm.model, "full")
    if name in SELECTORS:
        return make_cache(lm.model, "full", select=f"{name}:budget={budget},window={budget // 4}")
    return make_cache(lm.model, name, budget=budget, mode="decode", prompt_length=prompt_length)


@torch.inference_mode()
def follow(lm, cache, ids: list[int], reference: list[int]) -> tuple[list[float], list[float]]:
    """Per reference token: its NLL after the prompt ``ids`` and the tokens before it, fed one at a time into
    ``cache``, and whether it was the top choice."""
    logits = prefill(lm.model, torch.tensor([ids]), cache)
    nll, top = [], []
    for token in reference:
        logp = logits.float().log_softmax(dim=-1)[0]
        nll.append(-float(logp[token]))
        top.append(float(logp.argmax() == token))
        logits = forward(lm.model, cache, torch.tensor([[token]])).logits[:, -1]
    return nll, top


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2048, help="passage length in tokens")
    parser.add_argument("--contexts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the full cache's continuation")
    parser.add_argument("--budget", type=int, default=256, help="tokens per KV head held or read")
    parser.add_argument("--configs", default="h2o;streaming_llm;quest;tokenselect;recycled",
                        help="policies (decode mode) and selection rules separated by ';'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(";") if c.strip()]
    unknown = [c for c in configs if c not in POLICIES and c not in SELECTORS]
    if unknown or args.contexts < 1 or args.tokens < 4 or args.budget < 1:
        raise HeadwiseError(f"unknown configuration(s) {unknown}" if unknown else
                            "--contexts and --budget must be at least 1, --tokens at least 4")
    if args.out:
        check_output_file(Path(args.out))
    set_threads(args.threads)
    lm = load_model(args.model)
    passages = tasks.generate("qa", args.length, args.contexts, 0, tasks.token_counter(lm.tokenizer),
                              tokenizer_name=lm.name)
    per: dict[str, dict[str, list]] = {name: {"nll": [], "top": [], "context": [], "at": []}
                                       for name in ["full", *configs]}
    continuations = []
    for sample in passages:
        head, tail = protocol.prompt_parts(lm, dataclasses.replace(sample, question=INSTRUCTION, answer_prefix=""))
        ids = head + tail
        cache = build(lm, "full", args.budget, len(ids))
        with torch.inference_mode():
            first = prefill(lm.model, torch.tensor([ids]), cache)
            reference = decode(lm.model, first, cache, max_new_tokens=args.tokens, sampling=Sampling(), stop_ids=set())
        continuations.append(lm.tokenizer.decode(reference, skip_special_tokens=True))
        for name in ["full", *configs]:
            nll, top = follow(lm, build(lm, name, args.budget, len(ids)), ids, reference)
            for key, values in (("nll", nll), ("top", top)):
                per[name][key] += values
            per[name]["context"] += [sample.context_id] * len(nll)
            per[name]["at"] += list(range(len(nll)))
            print(f"{sample.context_id} {name}: NLL {sum(nll) / len(nll):.3f}, top-1 {sum(top) / len(top):.3f}",
                  flush=True)
    quarter = args.tokens // 4
    spans = {"all": range(args.tokens), "first quarter": range(quarter),
             "last quarter": range(args.tokens - quarter, args.tokens)}
    rows = []
    for name in configs:
        row = {"config": name}
        for span, keep in spans.items():
            idx = [i for i, at in enumerate(per[name]["at"]) if at in keep]
            gap = [per[name]["nll"][i] - per["full"]["nll"][i] for i in idx]
            clusters = [per[name]["context"][i] for i in idx]
            row[span] = {"nll_above_full": bootstrap_mean(gap, clusters)._asdict(),
                         "top1": bootstrap_mean([per[name]["top"][i] for i in idx], clusters)._asdict()}
        rows.append(row)
    print("| config | NLL above full, all [95% CI] | top-1, all | top-1, first quarter | top-1, last quarter |")
    print("|" + " --- |" * 5)
    for row in rows:
        cells = [f"{row['all']['nll_above_full']['mean']:+.3f} [{row['all']['nll_above_full']['lo']:+.3f}, "
                 f"{row['all']['nll_above_full']['hi']:+.3f}]"]
        cells += [f"{row[s]['top1']['mean']:.3f} [{row[s]['top1']['lo']:.3f}, {row[s]['top1']['hi']:.3f}]"
                  for s in spans]
        print(f"| {row['config']} | " + " | ".join(cells) + " |")
    if args.out:
        result = {"model": lm.name, "length": args.length, "contexts": args.contexts, "tokens": args.tokens,
                  "budget": args.budget, "instruction": INSTRUCTION, "rows": rows,
                  "full_nll": sum(per["full"]["nll"]) / len(per["full"]["nll"]), "continuations": continuations,
                  **runner.provenance()}
        write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "long_answer.py"))
