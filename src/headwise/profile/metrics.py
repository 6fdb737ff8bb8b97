"""Per-head metrics from captured statistics, their aggregation per KV head, and head roles.

Small pure functions on tensors shaped ``[layers, heads, ...]``:

- sink scores: mean attention a position receives from the queries that can see it; Gu et al. 2024 ("When
  attention sink emerges in language models") call a position a sink above 0.3; ACT (Yu et al. 2024, "Unveiling
  and harnessing hidden attention sinks") flags sinks beyond the first token above 0.1. StreamingLLM (Xiao et
  al. 2023) keeps the first tokens for this reason.
- retrieval score (Wu et al. 2024, "Retrieval head mechanistically explains long-context factuality"): the
  fraction of needle tokens a head copy-pastes while the model generates the needle.
- previous-token and induction scores (Olsson et al. 2022, "In-context learning and induction heads").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.errors import HeadwiseError

#: How the query heads of a GQA group combine into one KV-head value. Conservative for cache policies: a KV head
#: is as much a retrieval/induction/sink head as its strongest query head, and only as local as its least local.
KV_AGGREGATION: dict[str, str] = {
    "sink_first": "max", "sink_other": "max", "sinks_gu": "max", "sinks_act": "max", "prev_token": "max",
    "induction": "max", "retrieval": "max", "entropy": "mean",
}  # fmt: skip

ROLES = ("retrieval", "induction", "sink", "local", "mixed")


@dataclass(frozen=True)
class RoleThresholds:
    """Documented, adjustable thresholds that turn metrics into head roles.

    A head takes the first role whose test passes, in this order:

    1. ``retrieval``: retrieval score >= ``retrieval`` (0.1, as in Wu et al. 2024);
    2. ``induction``: induction score >= ``induction``;
    3. ``sink``: mean attention on the first token >= ``sink`` (the head mostly parks its attention there);
    4. ``local`` (streaming-safe): locality at window ``local_window`` >= ``local`` (mass inside the sinks plus
       that many recent keys, the pattern StreamingLLM keeps);
    5. ``mixed``: anything else.

    ``gu_sink`` and ``act_sink`` are the per-position sink thresholds of Gu et al. 2024 (0.3) and ACT (0.1);
    ``min_seen`` is the least number of queries a position must be visible to before it can count as a sink
    (so the last few positions, averaged over a handful of queries, are not flagged).
    """

    retrieval: float = 0.1
    induction: float = 0.3
    sink: float = 0.5
    local: float = 0.9
    local_window: int = 256
    gu_sink: float = 0.3
    act_sink: float = 0.1
    min_seen: int = 64


def sink_scores(received: torch.Tensor, seen: torch.Tensor, thresholds: RoleThresholds) -> dict[str, torch.Tensor]:
    """Sink metrics per head from mean received attention ``[heads, keys]`` and visibility counts ``[keys]``.

    Returns ``sink_first`` (position 0's score), ``sink_other`` (the best score among later positions seen by at
    least ``min_seen`` queries), ``sinks_gu`` and ``sinks_act`` (how many such positions, the first included,
    exceed the Gu et al. and ACT thresholds).
    """
    eligible = seen >= min(thresholds.min_seen, float(seen.max()))
    eligible[0] = True
    scores = received.masked_fill(~eligible, 0.0)
    other = scores[:, 1:].max(-1).values if scores.shape[1] > 1 else torch.zeros(scores.shape[0], dtype=scores.dtype)
    return {
        "sink_first": received[:, 0],
        "sink_other": other,
        "sinks_gu": (scores > thresholds.gu_sink).sum(-1).to(received.dtype),
        "sinks_act": (scores > thresholds.act_sink).sum(-1).to(received.dtype),
    }


def copy_paste_hits(
    argmax: torch.Tensor, generated: list[int], prompt_ids: list[int], needle_positions: list[int]
) -> torch.Tensor:
    """Wu et al. retrieval score of one run, per head: needle tokens copied / needle length.

    Parameters
    ----------
    argmax
        ``[layers, heads, steps]``: the most-attended position of each head when generating token ``t``.
    generated
        The ``steps`` generated token ids.
    prompt_ids
        The prompt's token ids (``x_j``).
    needle_positions
        Positions of the needle in the prompt.

    Head ``h`` copy-pastes at step ``t`` when ``w = generated[t]`` is a needle token and ``h``'s argmax ``j`` lies in
    the needle with ``x_j = w``. Each needle position counts once, so the score is at most 1.
    """
    layers, heads, _ = argmax.shape
    needle = set(needle_positions)
    needle_tokens = {prompt_ids[j] for j in needle}
    copied = [[set() for _ in range(heads)] for _ in range(layers)]
    for t, w in enumerate(generated):
        if w not in needle_tokens:
            continue
        for layer in range(layers):
            for head in range(heads):
                j = int(argmax[layer, head, t])
                if j in needle and prompt_ids[j] == w:
                    copied[layer][head].add(j)
    counts = [[len(c) for c in row] for row in copied]
    return torch.tensor(counts, dtype=torch.float64) / len(needle)


def aggregate_kv(values: torch.Tensor, group: int, how: str) -> torch.Tensor:
    """Combine ``[layers, heads]`` query-head values into ``[layers, heads // group]`` (GQA: head h -> h // group)."""
    grouped = values.reshape(values.shape[0], -1, group)
    if how == "max":
        return grouped.amax(-1)
    if how == "min":
        return grouped.amin(-1)
    if how == "mean":
        return grouped.mean(-1)
    raise HeadwiseError(f"unknown aggregation '{how}'")


def kv_aggregation(metric: str) -> str:
    """Aggregation rule of a metric (locality metrics take the minimum)."""
    return "min" if metric.startswith("locality_") else KV_AGGREGATION[metric]


def assign_roles(metrics: dict[str, torch.Tensor], thresholds: RoleThresholds) -> list[list[str]]:
    """A role per head (see :class:`RoleThresholds`) from ``[layers, heads]`` metrics; missing metrics never match."""
    key = f"locality_{thresholds.local_window}"
    if key not in metrics:
        raise HeadwiseError(f"no locality metric for window {thresholds.local_window}; measured: "
                            f"{sorted(k for k in metrics if k.startswith('locality_'))}")
    tests = [
        ("retrieval", "retrieval", thresholds.retrieval),
        ("induction", "induction", thresholds.induction),
        ("sink", "sink_first", thresholds.sink),
        ("local", key, thresholds.local),
    ]
    layers, heads = metrics[key].shape
    roles = [["mixed"] * heads for _ in range(layers)]
    for layer in range(layers):
        for head in range(heads):
            for role, metric, threshold in tests:
                value = metrics[metric][layer, head] if metric in metrics else torch.tensor(float("nan"))
                if bool(value >= threshold):
                    roles[layer][head] = role
                    break
    return roles
