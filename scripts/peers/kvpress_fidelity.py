"""Answer fidelity of kvpress presses: the full cache's answer teacher-forced on a kvpress-compressed context.

The kvpress twin of ``scripts/fidelity.py``, run inside ``.venv-kvpress`` (see ``kvpress_runner.py``, whose
prompt split, model loading and presses it uses). It reads the full cache's greedy answers from a fidelity file
that ``scripts/fidelity.py`` wrote for the same task files (rows ``full|SAMPLE_ID``), so both libraries are
measured against the very same answer tokens. For each press and ratio the context is prefilled inside the
press (kvpress's question-agnostic protocol, as in ``kvpress_runner.run_sample``), then the question and the
answer are fed at the positions that continue the uncompressed context, and the answer's mean negative
log-likelihood per token (``nll``) and top-1 agreement (``top1``) are appended to ``--out`` under the spec
``kvpress:NAME``. ``full`` (no press) gives the floor: the full cache on its own answer.

Usage (from the repository root)::

    .venv/bin/python scripts/fidelity.py --tasks runs/fid/tasks --methods streaming_llm --out runs/fid/headwise.jsonl
    .venv-kvpress/bin/python scripts/peers/kvpress_fidelity.py --tasks runs/fid/tasks \\
        --reference runs/fid/headwise.jsonl --presses full,expected_attention --out runs/fid/kvpress.jsonl
    .venv/bin/python scripts/fidelity.py --report runs/fid/headwise.jsonl runs/fid/kvpress.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvpress_runner import (  # the runner also puts headwise's standard-library modules on sys.path
    DEFAULT_MODEL_DIR,
    csv_list,
    expand_paths,
    load_model,
    load_samples,
    prefill_with_press,
    press_specs,
    prompt_parts,
)

from headwise.bench.fidelity import (
    add_row,
    answer_nll,
    format_summary,
    ratios_for,
    read_rows,
    reference_answers,
    row_key,
)
from headwise.compat import forward


def follow(model: Any, head: list[int], tail: list[int], answer: list[int], press: Any) -> tuple[float, float]:
    """Mean NLL per token of ``answer`` after ``tail`` on ``head`` compressed by ``press``, and top-1 agreement."""
    import torch

    with torch.inference_mode():
        cache = prefill_with_press(model, head, press)
        ids = tail + answer[:-1]
        positions = torch.arange(len(head), len(head) + len(ids)).unsqueeze(0)
        out = forward(model, cache, torch.tensor([ids]), position_ids=positions, logits_to_keep=len(answer))
    return answer_nll(out.logits[0], answer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    p.add_argument("--tasks", nargs="+", required=True, help="task JSONL files, globs or folders")
    p.add_argument("--reference", type=Path, required=True,
                   help="fidelity file of scripts/fidelity.py on the same tasks (its full-cache answers are used)")
    p.add_argument("--presses", default="full,expected_attention,adakv_expected_attention",
                   help="comma-separated press names (kvpress_runner.py --list-presses)")
    p.add_argument("--ratios", default="0.75,0.9", help="comma-separated fractions removed")
    p.add_argument("--model", default="smollm2-135m", help="model folder name under the headwise cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="JSONL, appended; finished rows are skipped")
    args = p.parse_args(argv)
    specs = press_specs()
    presses = csv_list(args.presses)
    unknown = [name for name in presses if name not in specs]
    if unknown:
        p.error(f"unknown presses {unknown}; known: {', '.join(specs)}")
    ratios = [float(r) for r in csv_list(args.ratios)]
    if any(not 0 < r < 1 for r in ratios):
        p.error(f"ratios must lie in (0, 1), got {ratios}")
    samples = load_samples(expand_paths(args.tasks))
    answers = reference_answers(read_rows(args.reference))
    missing = [s.id for s in samples if s.id not in answers]
    if missing:
        p.error(f"{args.reference} has no full-cache answer for {len(missing)} samples (first: {missing[0]}); "
                "run scripts/fidelity.py on the same task files first")

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(DEFAULT_MODEL_DIR / args.model)
    done = read_rows(args.out)
    for sample in samples:
        head, tail = prompt_parts(tokenizer, sample.context, sample.question)
        for name in presses:
            spec = f"kvpress:{name}"
            for ratio in ratios_for(name, ratios):
                if row_key(spec, ratio, sample.id) in done:
                    continue
                add_row(args.out, done, spec, ratio, sample.id, sample.task,
                        *follow(model, head, tail, answers[sample.id], specs[name].build(ratio)))
    print("\nmean over samples (lower nll and higher top1 are closer to the full cache):")
    print(format_summary(list(done.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
