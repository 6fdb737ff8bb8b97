"""How many tokens each layer and each KV head keeps: small pure functions.

* :func:`keep_count`: tokens to keep out of ``seen`` for a ratio removed or a token budget;
* :func:`layer_fractions`: per-layer multipliers of the average budget (uniform, or a PyramidKV-style
  linear decrease with depth), averaging to 1;
* :func:`layer_budgets`: tokens per layer from those multipliers, within the bounds a layer can keep, with
  their mean kept exactly (what a clipped layer cannot take goes to the others);
* :func:`adaptive_counts`: AdaKV-style split of one layer's budget across its heads, by one top-k over all
  heads' scores with a floor per head;
* :func:`chunk_scores`: one score per run of consecutive tokens, so that selection keeps whole runs (ChunkKV);
* :func:`check_schedule` and :func:`check_prompt`: the plan's layer schedule, and a prompt against the plan.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from headwise.errors import HeadwiseError

if TYPE_CHECKING:
    from headwise.cache import Plan

SCHEDULES = ("uniform", "pyramid")
ALLOCATIONS = ("uniform", "adaptive", "global")


def keep_count(seen: int, *, ratio: float | None = None, budget: int | None = None) -> int:
    """Tokens to keep out of ``seen``: ``round((1 - ratio) * seen)`` or ``min(budget, seen)``."""
    if (ratio is None) == (budget is None):
        raise ValueError("give exactly one of ratio and budget")
    if budget is not None:
        return min(budget, seen)
    assert ratio is not None
    return min(seen, round((1.0 - ratio) * seen))


def layer_fractions(num_layers: int, schedule: str = "uniform", slope: float = 0.5) -> list[float]:
    """Multipliers of the average per-layer budget, one per layer, with mean 1.

    ``pyramid`` (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling", 2024) decreases linearly from ``1 + slope`` at the first layer to ``1 - slope`` at the last.
    """
    check_schedule(schedule, slope)
    if schedule == "uniform" or num_layers == 1:
        return [1.0] * num_layers
    return [1.0 + slope * (1.0 - 2.0 * i / (num_layers - 1)) for i in range(num_layers)]


def layer_budgets(mean: int, fractions: list[float], low: int, high: int) -> list[int]:
    """Tokens per layer near ``mean * fractions[i]``, each in ``[low, high]``, summing to ``mean * len(fractions)``.

    A layer's budget is clipped to the bounds (``low``: the policy's minimum, ``high``: all it holds), and
    what clipping takes from (or gives to) it is spread over the unclipped layers by one common shift
    (water-filling): budget ``i`` is ``clip(mean * fractions[i] + c, low, high)``, with ``c`` chosen so the
    total is kept, then rounded to integers by largest remainder (ties to the earlier layer). So the unclipped
    layers stay an arithmetic sequence, as PyramidKV's (Cai et al. 2024) are, and budgets that decrease with
    depth before clipping still do.

    Parameters
    ----------
    mean : int
        Average tokens per layer asked for.
    fractions : list of float
        Multiplier of ``mean`` per layer (:func:`layer_fractions`, mean 1).
    low, high : int
        Bounds of every layer's budget, ``0 <= low <= high``.

    Returns
    -------
    list of int
        Budgets in ``[low, high]`` that sum to ``mean * len(fractions)`` clipped to ``[low, high]`` times the
        number of layers.
    """
    if not fractions:
        return []
    layers = len(fractions)
    total = min(max(mean * layers, low * layers), high * layers)
    ideal = [mean * f for f in fractions]

    def filled(shift: float) -> float:
        return sum(min(max(v + shift, low), high) for v in ideal)

    # filled() is piecewise linear and nondecreasing in the shift, with kinks where a layer meets a bound.
    kinks = sorted({b - v for v in ideal for b in (low, high)})
    lo = next(k for k in reversed(kinks) if filled(k) <= total)  # all layers at low: filled <= total
    hi = next(k for k in kinks if k >= lo and filled(k) >= total)  # all layers at high: filled >= total
    shift = lo if filled(hi) == filled(lo) else lo + (total - filled(lo)) * (hi - lo) / (filled(hi) - filled(lo))
    exact = [min(max(v + shift, low), high) for v in ideal]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(layers), key=lambda i: (counts[i] - exact[i], i))  # largest remainder first
    for i in [i for i in order if counts[i] < high][: total - sum(counts)]:
        counts[i] += 1
    return counts


def adaptive_counts(scores: list[torch.Tensor], total: int, floor: int) -> list[int]:
    """Split ``total`` kept tokens across heads by one top-k over all heads' scores, at least ``floor`` each.

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", 2024.

    Parameters
    ----------
    scores : list of 1-D tensors
        One score per stored token for each head (lengths may differ).
    total : int
        Tokens to keep over all heads.
    floor : int
        Tokens every head keeps at least (or all it has, if fewer).

    Returns
    -------
    list of int
        Tokens kept per head; they sum to ``min(total, all stored tokens)``.
    """
    sizes = [s.numel() for s in scores]
    total = min(total, sum(sizes))
    base = [min(floor, n) for n in sizes]
    left = total - sum(base)
    if left <= 0:
        # The floors alone exceed the budget: share it as evenly as the heads allow.
        return _even_split(sizes, total)
    rest = [torch.sort(s.float(), descending=True).values[b:] for s, b in zip(scores, base, strict=True)]
    owners = torch.cat([torch.full((r.numel(),), h, dtype=torch.long) for h, r in enumerate(rest)])
    chosen = owners[torch.topk(torch.cat(rest), left).indices]
    extra = torch.bincount(chosen, minlength=len(scores)).tolist()
    return [b + e for b, e in zip(base, extra, strict=True)]


def chunk_scores(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Each token's score replaced by the mean score of its run of ``size`` consecutive tokens.

    Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
    2025: ranking runs by their total score and keeping whole runs keeps phrases whole. The mean ranks full runs
    as their sum does, without penalising the last, shorter one.

    Parameters
    ----------
    scores : tensor [..., n]
        One score per token, in stored (position) order.
    size : int
        Tokens per run (the last run holds the ``n % size`` left over, if any); 1 leaves the scores as they are.

    Returns
    -------
    tensor [..., n]
        The run means, broadcast back to the tokens of each run.
    """
    if size < 1:
        raise HeadwiseError(f"the chunk size must be at least 1 token, got {size}")
    n = scores.shape[-1]
    if size == 1 or n == 0:
        return scores
    runs = math.ceil(n / size)
    padded = torch.nn.functional.pad(scores, (0, runs * size - n)).reshape(*scores.shape[:-1], runs, size)
    lengths = torch.full((runs,), float(size), dtype=scores.dtype, device=scores.device)
    lengths[-1] = n - (runs - 1) * size
    means = padded.sum(dim=-1) / lengths
    return means.repeat_interleave(size, dim=-1)[..., :n]


def _even_split(sizes: list[int], total: int) -> list[int]:
    counts = [0] * len(sizes)
    while total > 0:
        open_heads = [h for h, n in enumerate(sizes) if counts[h] < n]
        share = max(1, total // len(open_heads))
        for h in open_heads:
            take = min(share, sizes[h] - counts[h], total)
            counts[h] += take
            total -= take
            if total == 0:
                break
    return counts


def floor_tokens(layer_budget: int, floor_fraction: float) -> int:
    """AdaKV's per-head floor: a fraction of the head's uniform share, rounded up."""
    return math.ceil(layer_budget * floor_fraction)


def check_schedule(schedule: str, slope: float) -> None:
    """Refuse an unknown layer schedule, or a pyramid slope outside [0, 1) (NaN included)."""
    if schedule not in SCHEDULES:
        raise HeadwiseError(f"unknown schedule '{schedule}'; use one of {', '.join(SCHEDULES)}")
    if not 0 <= slope < 1:
        raise HeadwiseError(f"slope must be in [0, 1), got {slope}")


def check_prompt(plan: Plan, prompt_length: int) -> None:
    """Refuse a prompt of ``prompt_length`` tokens that ``plan`` cannot compress as asked.

    Two cases: in ``prefill`` mode a token budget larger than the prompt (nothing would be compressed; in
    ``decode`` mode the cache grows into its budget while generating), and a ratio that keeps
    fewer tokens than the policy's minimum (sinks + window), which the cache would keep instead, silently
    missing the ratio. Give the length of the whole prompt, before it is prefilled
    (:func:`headwise.api.make_plan` with ``prompt_length`` does). The chunks of a chunked prefill are not
    checked one by one: while fewer tokens than ``min_budget / (1 - ratio)`` have been seen, a layer keeps the
    policy's minimum, and the ratio holds again from there on.
    """
    policy = plan.policy
    if not policy.compresses:
        return
    if plan.budget is not None and plan.budget > prompt_length and plan.mode == "prefill":
        raise HeadwiseError(f"budget {plan.budget} is larger than the prompt ({prompt_length} tokens)")
    if plan.ratio:
        kept = keep_count(prompt_length, ratio=plan.ratio)
        if kept < policy.min_budget():
            raise HeadwiseError(
                f"ratio {plan.ratio} keeps {kept} of {prompt_length} tokens, below the minimum of policy "
                f"'{policy.name}' ({policy.min_budget()} tokens: sinks + window)"
            )
