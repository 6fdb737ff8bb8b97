"""Where prefill and decoding time goes: torch's profiler over one prefill and a run of decoding steps, with a
table of the operators, a split into attention, linear layers, copies and the rest, and a flame graph.

Usage::

    .venv/bin/python scripts/speed_profile.py [--model smollm2-135m] [--length 4096] [--steps 16]
        [--dtype bfloat16] [--policy full] [--ratio R] [--threads 2] [--out results/speed/profile-4096]

The prompt is the benchmark's first passkey prompt of ``--length`` tokens (seed 0, depth 0.5). One unprofiled
prefill and a few steps warm up; then the profiler records the prefill and ``--steps`` decoding steps of
headwise's cache (``--policy``, removing ``--ratio`` of it). Written under ``--out``: ``profile.json`` (the top
operators by self CPU time and the split, for prefill and for one decoding step), ``prefill.folded`` and
``decode.folded`` (folded stacks, for any flame-graph viewer) and ``flame-prefill.png``, ``flame-decode.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from headwise.api import make_cache, policy_names
from headwise.bench import protocol
from headwise.checks import DTYPES, check_output_dir, set_threads
from headwise.compat import forward
from headwise.errors import HeadwiseError, run_cli
from headwise.models import load_model
from headwise.report.html import write_atomic

#: Operator names (substrings) per part of the time, first match wins.
PARTS = {
    "attention": ("scaled_dot_product", "flash_attention", "bmm", "softmax", "attention", "attend"),
    "linear layers": ("aten::mm", "aten::addmm", "aten::linear"),
    "copies": ("aten::cat", "aten::copy_", "aten::_to_copy", "aten::index", "aten::gather"),
}


def part_of(name: str) -> str:
    return next((part for part, keys in PARTS.items() if any(k in name for k in keys)), "other")


def operator_table(prof: profile, per: int, rows: int = 15) -> tuple[list[dict], dict[str, float]]:
    """The top ``rows`` operators by self CPU milliseconds (divided by ``per`` runs) and the split by part."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    split: dict[str, float] = {}
    for e in events:
        split[part_of(e.key)] = split.get(part_of(e.key), 0.0) + e.self_cpu_time_total / 1000 / per
    top = [{"operator": e.key, "self_ms": e.self_cpu_time_total / 1000 / per, "calls": e.count / per}
           for e in events[:rows]]
    return top, split


@dataclass
class Frame:
    name: str
    value: float = 0.0
    children: dict[str, Frame] = field(default_factory=dict)


def folded_tree(lines: Iterable[str]) -> Frame:
    """The call tree of folded stacks (``outer;inner;leaf value`` per line)."""
    root = Frame("all (from the outermost module)")
    for line in lines:
        stack, _, value = line.rstrip().rpartition(" ")
        if not stack:
            continue
        root.value += float(value)
        node = root
        for name in stack.split(";"):
            node = node.children.setdefault(name, Frame(name))
            node.value += float(value)
    return root


def flame_graph(root: Frame, path: Path, title: str, depth: int = 28) -> None:
    """Draw ``root`` as a flame graph (callers below, callees on top, width = self+child time) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def height(node: Frame) -> int:
        return 1 + max((height(c) for c in node.children.values() if c.value / (root.value or 1.0) >= 0.002),
                       default=0)

    depth = min(depth, height(root))
    fig, ax = plt.subplots(figsize=(16, 0.32 * depth + 1.5))
    total = root.value or 1.0
    colors = {"attention": "#d9534f", "linear layers": "#f0ad4e", "copies": "#5bc0de", "other": "#9fb7c9"}

    def draw(node: Frame, x: float, level: int) -> None:
        if level >= depth or node.value / total < 0.002:
            return
        ax.barh(level, node.value / total, left=x, height=0.95, color=colors[part_of(node.name)],
                edgecolor="white", linewidth=0.3)
        width = node.value / total
        if width > 0.04:
            ax.text(x + 0.002, level, node.name[: int(width * 160)], va="center", fontsize=6.5)
        for child in sorted(node.children.values(), key=lambda c: -c.value):
            draw(child, x, level + 1)
            x += child.value / total

    draw(root, 0.0, 0)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.5, depth - 0.5)
    ax.set_yticks([])
    ax.set_xlabel("share of the profiled CPU time (red: attention, orange: linear layers, blue: copies)")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


#: Frames left out of the stacks: the module-call machinery, transformers' decorators, the profiler and the Python
#: wrappers of built-ins.
NOISE = ("torch/nn/modules/module.py(", "<built-in", "utils/generic.py(", "utils/deprecation.py(",
         "output_capturing.py(", "torch/profiler/", "torch/autograd/profiler")


def frame(name: str) -> str:
    """An event's name as a frame of the graph: ``path/file.py(12): function`` as ``file.py:function``, and a
    module's instance number dropped (``nn.Module: LlamaDecoderLayer_3`` as ``LlamaDecoderLayer``), so that the
    layers' calls add up."""
    if name.startswith("nn.Module: "):
        return re.sub(r"_\d+$", "", name.removeprefix("nn.Module: "))
    where, _, function = name.partition(": ")
    if function and where.endswith(")"):
        return f"{Path(where.split('(')[0]).name}:{function}"
    return name


def export_stacks(prof: profile, path: Path) -> None:
    """The profile's folded stacks of self CPU microseconds (``outer;inner;leaf value`` per line), from each
    event's chain of parents (Python frames, modules, operators) starting at the outermost module, written
    whole or not at all."""
    totals: dict[str, float] = {}
    for event in prof.events():
        chain, parent = [event], event.cpu_parent
        while parent is not None:
            chain.append(parent)
            parent = parent.cpu_parent
        names = [e.name for e in reversed(chain) if not any(k in e.name for k in NOISE)]
        start = next((i for i, n in enumerate(names) if n.startswith("nn.Module: ")), None)
        if start is None or any(k in event.name for k in NOISE):
            continue
        stack = ";".join(frame(n).replace(" ", "_") for n in names[start:])
        totals[stack] = totals.get(stack, 0.0) + event.self_cpu_time_total
    write_atomic(path, "".join(f"{stack} {value:.0f}\n" for stack, value in totals.items() if value >= 1))


def profiled(run) -> profile:
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, with_modules=True) as prof:
        run()
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=16, help="decoding steps profiled")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--policy", default="full")
    parser.add_argument("--ratio", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/speed/profile-4096")
    args = parser.parse_args()
    if args.steps < 1:
        raise HeadwiseError("--steps must be at least 1")
    if args.policy not in policy_names():
        raise HeadwiseError(f"unknown policy '{args.policy}': use one of {', '.join(policy_names())}")
    out = check_output_dir(Path(args.out))
    out.mkdir(parents=True, exist_ok=True)
    set_threads(args.threads)
    lm = load_model(args.model, dtype=args.dtype)
    prompt = protocol.timing_prompt(lm, args.length)[1]
    ids = torch.tensor([prompt])
    token = torch.tensor([[prompt[-1]]])

    def fresh():
        return make_cache(lm.model, args.policy, ratio=args.ratio, prompt_length=ids.shape[1])

    result = {"model": lm.name, "dtype": lm.dtype, "prompt_tokens": ids.shape[1], "policy": args.policy,
              "ratio": args.ratio, "steps": args.steps, "threads": torch.get_num_threads(),
              "versions": {name: version(name) for name in ("torch", "transformers")},
              "machine": {"platform": platform.platform(), "cpu": platform.processor()}}
    with torch.inference_mode():
        cache = fresh()
        forward(lm.model, cache, ids, logits_to_keep=1)  # warm-up
        for _ in range(3):
            forward(lm.model, cache, token)
        cache = fresh()
        prof = profiled(lambda: forward(lm.model, cache, ids, logits_to_keep=1))
        result["prefill"] = dict(zip(("top", "split_ms"), operator_table(prof, 1), strict=True))
        export_stacks(prof, out / "prefill.folded")
        prof = profiled(lambda: [forward(lm.model, cache, token) for _ in range(args.steps)])
        result["decode_step"] = dict(zip(("top", "split_ms"), operator_table(prof, args.steps), strict=True))
        export_stacks(prof, out / "decode.folded")
    for stage, label in (("prefill", "one prefill"), ("decode", f"{args.steps} decoding steps")):
        tree = folded_tree((out / f"{stage}.folded").read_text().splitlines())
        flame_graph(tree, out / f"flame-{stage}.png",
                    f"{lm.name} {lm.dtype}, {ids.shape[1]}-token prompt, {args.policy}: {label}")
    write_atomic(out / "profile.json", json.dumps(result, indent=1) + "\n")
    for stage in ("prefill", "decode_step"):
        split = result[stage]["split_ms"]
        print(f"{stage}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(split.items(), key=lambda kv: -kv[1])))
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "speed_profile.py"))
