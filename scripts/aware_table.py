"""The question-aware table against OpenVINO GenAI (BENCHMARKS.md, issue 14), rebuilt from the committed stores.

    .venv/bin/python scripts/aware_table.py [--tasks passkey] [--length 2048]

Reads headwise's store (``results/aware/smollm2-135m-LENGTH/results.jsonl``, or its ``.gz`` copy) and OpenVINO's
(``results/aware/openvino-LENGTH.jsonl``), written by ``scripts/sweep.sh aware LENGTH``, and prints one Markdown
row per method: the mean of the task means at 75% and 90% removed [95% bootstrap interval], and the paired
difference with OpenVINO's eviction over the answers both have (``*``: the interval excludes zero). Only the
tasks given are read, so that a table never mixes a finished task with an unfinished one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from headaware_variants import summarise

from headwise.bench.cli import split_list
from headwise.bench.store import read_records
from headwise.errors import HeadwiseError, run_cli

PEER = "OpenVINO GenAI eviction"
LABELS = {"openvino_eviction": PEER, "headwise": "headwise head-aware (default)", "snapkv": "headwise SnapKV"}


def cell(score: dict) -> str:
    return f"{score['mean']:.3f} [{score['lo']:.3f}, {score['hi']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="passkey", help="the finished tasks to read (comma-separated)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--results", default="results/aware", help="the folder of the two stores")
    args = parser.parse_args()
    tasks = set(split_list(args.tasks, what="task"))
    folder = Path(args.results)
    records = [r for path in (folder / f"smollm2-135m-{args.length}/results.jsonl",
                              folder / f"openvino-{args.length}.jsonl")
               for r in read_records(path) if not r.get("calibration") and r["task"] in tasks]
    compressed = [{**r, "variant": LABELS[r["method"]]} for r in records if r["method"] in LABELS]
    if not compressed:
        raise HeadwiseError(f"no question-aware records of {', '.join(sorted(tasks))} under {folder}")
    rows = summarise(compressed, list(LABELS.values()), versus=PEER)
    print("| question-aware | 75% removed | vs OpenVINO | 90% removed | vs OpenVINO |")
    print("| --- | --- | --- | --- | --- |")
    for label in LABELS.values():
        cells = []
        for ratio in (0.75, 0.9):
            row = next((r for r in rows if r["variant"] == label and r["ratio"] == ratio), None)
            if row is None:
                cells += ["-", ""]
                continue
            d = row.get("vs_first")
            versus = "" if d is None else f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            versus += " *" if d and d["excludes_zero"] else ""
            cells += [f"{cell(row['score'])} ({row['answers']})", versus]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "aware_table.py"))
