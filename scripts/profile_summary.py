"""Summarise profile.json files as Markdown (the figures in docs/PROFILES.md come from this script).

Usage: .venv/bin/python scripts/profile_summary.py runs/profile-smollm2-135m/profile.json [...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from headwise.profile import HeadProfile
from headwise.profile.metrics import ROLES


def heads_list(values: torch.Tensor, threshold: float, limit: int = 12) -> str:
    """``L<layer>h<head> (score)`` for heads at or above ``threshold``, strongest first."""
    flat = torch.nan_to_num(values, nan=-1.0)
    order = flat.flatten().argsort(descending=True)
    picked = [int(i) for i in order if flat.flatten()[i] >= threshold][:limit]
    width = values.shape[1]
    return ", ".join(f"L{i // width}h{i % width} ({float(values.flatten()[i]):.2f})" for i in picked) or "none"


def summary(path: Path) -> str:
    p = HeadProfile.load(path)
    th = p.thresholds
    lw = th["local_window"]
    sink = p.metric("sink_first")
    local = p.metric(f"locality_{lw}")
    retr = p.metric("retrieval")
    ind = p.metric("induction")
    runs = p.retrieval_runs
    total = p.num_layers * p.num_heads
    counts = {r: sum(x == r for row in p.roles for x in row) for r in ROLES}
    kv_counts = {r: sum(x == r for row in p.kv_roles for x in row) for r in ROLES}
    lines = [
        f"### {p.model}",
        "",
        f"- settings: {p.settings}",
        f"- needle runs answered correctly: {runs['passed']}/{runs['runs']}",
        f"- roles over {total} query heads: " + ", ".join(f"{r} {counts[r]}" for r in ROLES),
        f"- roles over {p.num_layers * p.num_kv_heads} KV heads: " + ", ".join(f"{r} {kv_counts[r]}" for r in ROLES),
        f"- first-token sink score (mean attention received by position 0): mean {sink.mean():.2f}, "
        f"{int((sink > th['gu_sink']).sum())}/{total} heads above {th['gu_sink']} (Gu et al.)",
        "- other sink positions (heads above the ACT threshold 0.1): "
        + (", ".join(f"{s['position']} {s['token']!r} ({s['heads_act']})" for s in p.sinks[:6]) or "none"),
        f"- retrieval heads (score >= {th['retrieval']}): {int((retr >= th['retrieval']).sum())}: "
        + heads_list(retr, th["retrieval"]),
        f"- induction heads (score >= {th['induction']}): {int((ind >= th['induction']).sum())}: "
        + heads_list(ind, th["induction"]),
        "",
        f"| layer | type | roles (R/I/S/L/M) | mean sink_first | mean locality_{lw} | max retrieval | max induction |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in range(p.num_layers):
        roles = p.roles[layer]
        code = "/".join(str(roles.count(r)) for r in ROLES)
        kind = "sliding" if p.layer_types[layer] == "sliding_attention" else "full"
        lines.append(
            f"| {layer} | {kind} | {code} | {sink[layer].mean():.2f} | {local[layer].mean():.2f} | "
            f"{retr[layer].max():.2f} | {ind[layer].max():.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summary(Path(arg)))
