"""Peak memory and time of the attention capture at a long length, against a plain forward pass.

Usage: .venv/bin/python scripts/profile_memory.py [--model smollm2-135m] [--length 8192]

Both passes compute only the last position's logits; ``PeakRSS`` samples the process's resident memory.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from headwise.capture import CaptureSettings, capture
from headwise.errors import run_cli
from headwise.memory import PeakRSS
from headwise.models import load_model
from headwise.profile.data import prose_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=8192)
    args = parser.parse_args()
    lm = load_model(args.model)
    ids = torch.tensor([prose_ids(lm.tokenizer, args.length, 0)])
    with torch.inference_mode():
        lm.model(input_ids=ids[:, :64], logits_to_keep=1)  # warm-up
        with PeakRSS() as plain:
            start = time.perf_counter()
            lm.model(input_ids=ids, logits_to_keep=1)
            plain_s = time.perf_counter() - start
        with PeakRSS() as profiled, capture(lm.model, CaptureSettings()) as recorder:
            start = time.perf_counter()
            lm.model(input_ids=ids, logits_to_keep=1)
            capture_s = time.perf_counter() - start
    gib = 2**30
    print(f"{lm.name}, {ids.shape[1]} tokens")
    print(f"forward pass:          peak +{plain.delta / gib:.2f} GiB above start, {plain_s:.1f} s")
    print(f"forward with capture:  peak +{profiled.delta / gib:.2f} GiB above start, {capture_s:.1f} s")
    print(f"capture overhead:      {(profiled.delta - plain.delta) / gib:.2f} GiB above the forward pass")
    print(f"layers captured: {len(recorder.layers)}")


if __name__ == "__main__":
    sys.exit(run_cli(main, "profile_memory.py"))
