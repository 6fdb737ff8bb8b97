"""How closely a compressed cache follows the full cache: a continuous score for choosing policy options.

Usage::

    .venv/bin/headwise bench --tasks-only --out runs/dev-2k --seed 1 --lengths 2048 --samples 4 \\
        --tasks passkey,multivalue,kv
    .venv/bin/python scripts/fidelity.py --tasks runs/dev-2k/tasks --ratios 0.75,0.9 \\
        --methods full streaming_llm "headwise:profile=runs/profile-smollm2/profile.json,budgets=coverage" \\
        --out runs/dev-2k/fidelity.jsonl
    .venv/bin/python scripts/fidelity.py --report runs/dev-2k/fidelity.jsonl   # means of one or more files

On a small model the benchmark's exact-match scores are mostly 0 or 1 on a handful of samples, too coarse to
tell two option settings apart. Here each sample is answered once with the full cache (greedy, the
question-agnostic protocol of ``headwise bench``); then, for each method and ratio, the context is compressed
the same way and the full cache's answer is teacher-forced after the question. Reported per method and ratio:
the mean negative log-likelihood per answer token (``nll``, lower is closer to the full cache) and the fraction
of answer tokens that are still the compressed model's top choice (``top1``). Method ``full`` gives the floor,
the full cache's own NLL of its answer (run once, at ratio 0); when it is present the means also show each
method's excess over it, sample by sample. Each (method, ratio, sample) is appended to ``--out`` as it
finishes, so an interrupted run resumes. ``scripts/peers/kvpress_fidelity.py`` writes the same rows for kvpress
presses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from headwise.api import make_cache, parse_options
from headwise.bench.fidelity import add_row, answer_nll, answer_row, format_summary, ratios_for, read_rows, row_key
from headwise.bench.runner import prompt_parts
from headwise.bench.store import append_record
from headwise.bench.tasks import read_samples
from headwise.checks import check_output_file, set_threads
from headwise.compat import forward
from headwise.errors import run_cli
from headwise.generation import Sampling, decode, prefill, stop_token_ids
from headwise.models import load_model


def compressed_context(lm, method: str, options: dict, ratio: float, head: list[int]):
    """A cache holding the context ``head`` compressed by ``method`` at ``ratio``, sealed; and its last logits."""
    cache = make_cache(lm.model, method, ratio=ratio, prompt_length=len(head), options=options)
    logits = prefill(lm.model, torch.tensor([head]), cache)
    if hasattr(cache, "seal"):
        cache.seal()
    return cache, logits


@torch.inference_mode()
def follow(lm, cache, tail: list[int], answer: list[int]) -> tuple[float, float]:
    """Mean NLL per token of ``answer`` after ``tail`` in ``cache``, and the fraction that is the top choice."""
    ids = torch.tensor([tail + answer[:-1]])
    logits = forward(lm.model, cache, ids, logits_to_keep=len(answer)).logits[0]
    return answer_nll(logits, answer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=Path, help="folder of task JSONL files (headwise bench --tasks-only)")
    p.add_argument("--methods", nargs="+", help="NAME or NAME:key=value,key=value")
    p.add_argument("--ratios", default="0.75,0.9", help="comma-separated fractions removed")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSONL, appended; finished rows are skipped")
    p.add_argument("--report", type=Path, nargs="+", metavar="FILE",
                   help="only print the means of these fidelity files together (e.g. this script's and the kvpress "
                        "twin's, scripts/peers/kvpress_fidelity.py) and exit")
    args = p.parse_args()
    if args.report:
        print(format_summary([r for path in args.report for r in read_rows(path).values()]))
        return
    if not (args.tasks and args.methods and args.out):
        p.error("--tasks, --methods and --out are required (or --report FILE...)")
    check_output_file(args.out)
    set_threads(args.threads)
    lm = load_model(args.model)
    samples = [s for f in sorted(args.tasks.glob("*.jsonl")) for s in read_samples(f)]
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = []  # (spec as given, policy name, options)
    for spec in args.methods:
        name, _, opts = spec.partition(":")
        methods.append((spec, name, parse_options([o for o in opts.split(",") if o])))
    done = read_rows(args.out)
    for sample in samples:
        head, tail = prompt_parts(lm, sample)
        ref_key = answer_row(sample.id)
        if ref_key not in done:
            cache, logits = compressed_context(lm, "full", {}, 0.0, head)
            logits = prefill(lm.model, torch.tensor([tail]), cache)
            tokens = decode(lm.model, logits, cache, max_new_tokens=sample.max_new_tokens, sampling=Sampling(),
                            stop_ids=stop_token_ids(lm))
            done[ref_key] = {"row": ref_key, "answer": tokens, "text": lm.tokenizer.decode(tokens)}
            append_record(args.out, done[ref_key])
        answer = done[ref_key]["answer"]
        for spec, name, options in methods:
            for ratio in ratios_for(name, ratios):
                if row_key(spec, ratio, sample.id) in done:
                    continue
                cache, _ = compressed_context(lm, name, options, ratio, head)
                add_row(args.out, done, spec, ratio, sample.id, sample.task, *follow(lm, cache, tail, answer))
    print("\nmean over samples (lower nll and higher top1 are closer to the full cache):")
    print(format_summary([r for r in done.values() if r.get("spec") in args.methods]))


if __name__ == "__main__":
    sys.exit(run_cli(main, "fidelity.py"))
