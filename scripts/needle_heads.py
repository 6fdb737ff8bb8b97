"""Which KV heads a compressed cache's wrong answer needed: raise the needle in chosen heads, see what comes back.

    .venv/bin/python scripts/needle_heads.py --task passkey --answers 93817,64597 [--policy kvzip] [--ratio 0.9] \\
        [--tasks-dir results/smollm2-135m-2048/tasks] [--seed 0] --out results/headaware/needle-heads.json

For each answer given (a question of the task file whose answers include it), the context is prefilled densely and
the policy's cache rebuilt from it (:func:`headwise.dense.compress`, KVzip's reconstruction included) several
times: as it is; with the needle's paragraph (the blank-line-delimited paragraph holding the answer) given the
highest score in every head; in every head of one layer at a time; and in one head at a time of the layers that
alone bring the answer back. The budget stays the plan's: the needle's tokens displace others. Greedy answers (up
to the question's ``max_new_tokens``, ended by the model's end of turn) are scored as the benchmark scores them.
Only a policy ranked by a reconstruction (``kvzip``) is diagnosed: its scores are what gets raised (to 1, the most
attention a token can receive). The JSON lists, per answer, the plain and all-heads outputs and the layers and
(layer, KV head) pairs that alone fix it. A diagnosis, not a method: no policy uses it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from headwise import dense
from headwise.api import make_plan
from headwise.bench.cli import split_list
from headwise.bench.protocol import prompt_parts, reconstruction_parts
from headwise.bench.scoring import score
from headwise.bench.tasks import Sample
from headwise.checks import check_output_file, set_threads
from headwise.errors import HeadwiseError, run_cli
from headwise.generation import prefill, stop_token_ids
from headwise.models import load_model
from headwise.report.html import write_atomic


def needle_positions(tokenizer, head: list[int], answer: str) -> list[int]:
    """Token positions of ``head`` inside the paragraph that holds ``answer``."""
    text = tokenizer.decode(head)
    at = text.find(answer)
    if at < 0:
        raise HeadwiseError(f"the answer {answer} is not in its context")
    start, stop = text.rfind("\n\n", 0, at) + 2, text.find("\n\n", at)
    stop = len(text) if stop < 0 else stop
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(spans) if a < stop and b > start]


def diagnose(lm, question: Sample, answer: str, policy: str, ratio: float) -> dict:
    """The outputs of one question's compressed caches with the needle raised in chosen heads (module docstring)."""
    head, tail = prompt_parts(lm, question)
    captured = dense.capture(lm.model, torch.tensor([head]))
    rows = dense.reconstruct(lm.model, captured, *reconstruction_parts(lm, question))
    needle = needle_positions(lm.tokenizer, head, answer)
    stops = stop_token_ids(lm)

    def reply(raised: list[tuple[int, int]]) -> tuple[str, float]:
        scores = tuple(None if r is None else r.clone() for r in rows)
        for layer, kv_head in raised:
            scores[layer][:, kv_head, needle] = 1.0  # the most attention a token can receive
        cache = dense.compress(lm.model, captured, make_plan(policy, ratio=ratio), scores)
        cache.seal()
        logits = prefill(lm.model, torch.tensor([tail]), cache)
        ids = [int(logits.argmax())]
        while len(ids) < question.max_new_tokens and ids[-1] not in stops:
            logits = prefill(lm.model, torch.tensor([[ids[-1]]]), cache)
            ids.append(int(logits.argmax()))
        text = lm.tokenizer.decode(ids, skip_special_tokens=True)
        return text, score(question.scoring, text, question.answers)

    heads = {layer: list(range(r.shape[1])) for layer, r in enumerate(rows) if r is not None}
    fixing = [layer for layer, hs in heads.items() if reply([(layer, h) for h in hs])[1] == 1.0]
    return {"answer": answer, "question": question.id, "needle_tokens": len(needle), "plain": reply([]),
            "every_head": reply([(layer, h) for layer, hs in heads.items() for h in hs]), "layers_alone": fixing,
            "heads_alone": [[layer, h] for layer in fixing for h in heads[layer] if reply([(layer, h)])[1] == 1.0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", required=True)
    parser.add_argument("--answers", required=True, help="comma-separated answers of the questions to diagnose")
    parser.add_argument("--policy", default="kvzip")
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--tasks-dir", default="results/smollm2-135m-2048/tasks")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    out = Path(args.out)
    check_output_file(out)
    path = Path(args.tasks_dir) / f"{args.task}-{args.length}-s{args.seed}.jsonl"
    if not path.is_file():
        raise HeadwiseError(f"no task file {path}: run `headwise bench --tasks-only` first")
    samples = [Sample.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    wanted = split_list(args.answers, what="answer")
    questions = [next((s for s in samples if answer in s.answers), None) for answer in wanted]
    if None in questions:
        raise HeadwiseError(f"no question of {path} has the answer {wanted[questions.index(None)]}")
    if not make_plan(args.policy, ratio=args.ratio).policy.reconstructs():  # refused before the model loads
        raise HeadwiseError(f"policy '{args.policy}' takes no raised scores: only a policy ranked by a "
                            "reconstruction (kvzip) is diagnosed here")
    set_threads(1)
    lm = load_model(args.model, dtype="float32")
    results = []
    for answer, question in zip(wanted, questions, strict=True):
        results.append(diagnose(lm, question, answer, args.policy, args.ratio))
        print(json.dumps(results[-1]), flush=True)
    summary = {"model": lm.name, "task": args.task, "policy": args.policy, "ratio": args.ratio, "seed": args.seed,
               "length": args.length, "answers": results}
    write_atomic(out, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "needle_heads.py"))
