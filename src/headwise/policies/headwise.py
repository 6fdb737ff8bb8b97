"""Head-aware compression from a profile: retrieval heads keep their memory, the rest shrink.

The idea of DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", 2024) and RazorAttention (Tang et al., "RazorAttention: Efficient KV Cache Compression
Through Retrieval Heads", 2024): only a few heads need the whole context. DuoAttention learns which ones by
optimisation; here they come from a :class:`~headwise.profile.schema.HeadProfile` measured on calibration
inputs (``headwise profile``), with no training, and the memory of every shrunk head is freed.

Budgets are shared over all compressed KV heads of the model, so the total meets the requested ratio or
token budget exactly (see :func:`role_budgets`). With ``budgets="coverage"`` (the default):

1. every head first gets a floor of ``sinks + window`` tokens (all a streaming head needs);
2. retrieval heads, strongest retrieval score first, then grow to the whole context;
3. what is left goes to all the other heads, whatever their role, by the profile's locality curve of each
   (attention mass inside the sinks plus the last ``w`` keys, measured at several ``w``), so that over all
   heads the kept windows would cover as much attention mass as the budget allows (see
   :func:`coverage_budgets`). A head whose attention reaches far back gets a large budget; a head that looks
   only at its last few tokens gets a small one.

With ``budgets="roles"``, step 3 follows the roles instead: the heads that are neither retrieval nor streaming
(induction, mixed) share what is left, evenly, up to the whole context, and anything still left goes back to
the streaming heads.

Either way each head ranks its tokens by its role: streaming heads (profile roles ``local`` and ``sink``) keep
the sinks plus the most recent tokens (StreamingLLM), the others their top tokens by ``other`` (SnapKV by
default); ``other=streaming_llm`` makes every head keep sinks plus a recent window.

With ``budgets="scores"`` (and the plan's ``allocation=global``, then its default, so only from a dense
prefill) the retrieval heads keep everything and every other head, whatever its role, ranks its tokens by
``other``; what the retrieval heads leave goes to the highest of those scores over all heads of all layers at once
(KVzip's budgets, Kim et al. 2025, with ``other=kvzip``). If the budget cannot hold the retrieval heads whole,
which of their tokens go is arbitrary. With ``retrieval_keep=f`` below 1 a retrieval head instead keeps at least
its top share ``f`` of the context by ``other`` and competes for more in the same top-k: a floor for the heads
that read far, rather than their whole context.

``whole=N`` serves N more heads as retrieval heads, those that send the most attention beyond the profile's
largest measured window first: DuoAttention keeps a quarter to a half of a GQA model's heads whole, while the
profile's retrieval threshold picks a few. ``retrieval_keep=f`` caps what a retrieval head takes in step 2 at
the share ``f`` of the context (its tokens then ranked by ``other``), so a tight budget reaches the other heads;
with ``budgets="scores"`` that share is the head's floor (see above).

RazorAttention's compensation token for the shrunk heads is the plan option ``compensate=true`` (it applies
to any policy).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import HeadwiseError
from headwise.policies.base import Policy
from headwise.policies.streaming_llm import StreamingLLM
from headwise.profile.schema import HeadProfile

STREAMING_ROLES = ("local", "sink")


def head_kinds(profile: HeadProfile, retrieval_threshold: float) -> tuple[dict[tuple[int, int], str],
                                                                         dict[tuple[int, int], float]]:
    """Each (layer, KV head) of the full-attention layers as ``"retrieval"`` (profile role retrieval, or a
    retrieval score reaching ``retrieval_threshold``), ``"streaming"`` (roles local and sink) or ``"other"``, and
    its retrieval score (0 where not measured)."""
    retrieval = profile.kv_metrics.get("retrieval")
    kinds: dict[tuple[int, int], str] = {}
    strength: dict[tuple[int, int], float] = {}
    for layer, (roles, kind) in enumerate(zip(profile.kv_roles, profile.layer_types, strict=True)):
        if kind != "full_attention":
            continue
        for head, role in enumerate(roles):
            score = retrieval[layer][head] if retrieval else float("nan")
            score = 0.0 if score != score else score  # NaN: not measured
            is_retrieval = role == "retrieval" or score >= retrieval_threshold
            kinds[layer, head] = "retrieval" if is_retrieval else "streaming" if role in STREAMING_ROLES else "other"
            strength[layer, head] = score
    return kinds, strength


def promote_far_heads(
    kinds: dict[tuple[int, int], str], strength: dict[tuple[int, int], float], far: dict[tuple[int, int], float],
    count: int,
) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], float]]:
    """``kinds`` and ``strength`` with the ``count`` non-retrieval heads of most ``far`` mass made retrieval heads.

    They are served after every profile retrieval head, the farthest-reaching first: their strength becomes
    ``far - 2``, below any retrieval score (which lies in [0, 1]).
    """
    rest = sorted((k for k, kind in kinds.items() if kind != "retrieval"), key=lambda k: -far[k])
    chosen = rest[:max(count, 0)]
    return ({**kinds, **dict.fromkeys(chosen, "retrieval")},
            {**strength, **{k: far[k] - 2.0 for k in chosen}})


def role_budgets(
    kinds: list[str],
    strength: list[float],
    n: int,
    total: int,
    floor: int,
    curves: list[list[tuple[int, float]]] | None = None,
    cap: int | None = None,
) -> list[int]:
    """Tokens per head for heads of ``kinds`` ('retrieval', 'streaming' or 'other') out of ``n`` each.

    Parameters
    ----------
    kinds : list of str
        Role of each head.
    strength : list of float
        Retrieval score of each head; stronger retrieval heads are served first.
    n : int
        Tokens each head holds now.
    total : int
        Tokens to keep over all heads (clipped to ``len(kinds) * n``).
    floor : int
        Tokens every head gets before any head grows (clipped to ``n``).
    curves : list of list of (int, float), optional
        Coverage curve of each head (see :func:`coverage_budgets`). If given, what the retrieval heads leave
        goes to the other heads, whatever their kind, by coverage; otherwise 'other' heads share it evenly
        before 'streaming' heads get any.
    cap : int, optional
        Tokens a retrieval head grows to before the other heads get any (at least ``floor``); what the others
        cannot take goes back to the retrieval heads. None: the whole context.

    Returns
    -------
    list of int
        Per-head counts, each in ``[0, n]``, summing to ``min(total, len(kinds) * n)``.
    """
    heads = len(kinds)
    total = min(total, heads * n)
    floor = min(floor, n)
    if heads * floor >= total:
        share, extra = divmod(total, heads)
        return [share + (i < extra) for i in range(heads)]
    counts = [floor] * heads
    left = total - heads * floor
    retrieval = sorted((i for i, k in enumerate(kinds) if k == "retrieval"), key=lambda i: -strength[i])

    def serve_retrieval(up_to: int, left: int) -> int:  # grow them in turn up to ``up_to``; return what is left
        for i in retrieval:
            grow = min(max(up_to - counts[i], 0), left)
            counts[i] += grow
            left -= grow
        return left

    left = serve_retrieval(n if cap is None else min(max(cap, floor), n), left)
    if curves is not None:
        rest = [i for i, k in enumerate(kinds) if k != "retrieval"]
        shifted = [[(t - floor, m) for t, m in curves[i]] for i in rest]
        for i, grow in zip(rest, coverage_budgets(shifted, n - floor, left), strict=True):
            counts[i] += grow
            left -= grow
    else:
        for kind in ("other", "streaming"):
            left = share_evenly(counts, {i: n for i, k in enumerate(kinds) if k == kind}, left)
    serve_retrieval(n, left)  # what the other heads cannot take goes back to the retrieval heads
    return counts


def share_evenly(counts: list[int], caps: dict[int, int], left: int) -> int:
    """Grow ``counts[i]`` for each ``i`` in ``caps`` up to ``caps[i]``, evenly, by ``left`` tokens at most.

    Returns the tokens still left. ``counts`` is updated in place.
    """
    while left > 0 and (open_heads := [i for i in caps if counts[i] < caps[i]]):
        share, extra = divmod(left, len(open_heads))
        for rank, i in enumerate(open_heads):
            grow = min(caps[i] - counts[i], share + (rank < extra))
            counts[i] += grow
            left -= grow
    return left


def coverage_budgets(curves: list[list[tuple[int, float]]], n: int, total: int) -> list[int]:
    """Tokens per head that cover the most attention mass in total, from each head's coverage curve.

    Each curve lists ``(tokens, mass)`` points: keeping ``tokens`` tokens covers ``mass`` of the head's
    attention; keeping all ``n`` covers everything. Between points the mass is interpolated linearly, over its
    upper concave envelope, so filling the steepest segments first (water-filling) is the optimum; segments of
    equal slope (heads with the same curve) grow evenly.

    Parameters
    ----------
    curves : list of list of (int, float)
        Measured points per head, in any order; points at or beyond ``n`` tokens are ignored, points at or
        below 0 tokens give the mass covered with no tokens (0 if there is none).
    n : int
        Tokens each head holds now.
    total : int
        Tokens to keep over all heads (clipped to ``[0, len(curves) * n]``).

    Returns
    -------
    list of int
        Per-head counts, each in ``[0, n]``, summing to ``min(max(total, 0), len(curves) * n)``.
    """
    total = max(0, min(total, len(curves) * n))
    segments = []  # (slope, head, tokens) in the order each head's envelope climbs
    for head, curve in enumerate(curves):
        base = max((m for t, m in curve if t <= 0), default=0.0)
        points = sorted({(0, base), *((t, m) for t, m in curve if 0 < t < n), (n, 1.0)})
        hull: list[tuple[int, float]] = []
        for t, m in points:
            m = max(m, hull[-1][1] if hull else m)  # coverage never shrinks as the window grows
            while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (t - hull[-2][0]) <= (m - hull[-2][1]) * (
                hull[-1][0] - hull[-2][0]
            ):
                hull.pop()
            hull.append((t, m))
        segments += [((m1 - m0) / (t1 - t0), head, t1 - t0) for (t0, m0), (t1, m1) in itertools.pairwise(hull)]
    counts = [0] * len(curves)
    left = total
    segments.sort(key=lambda seg: -seg[0])
    for _, tied in itertools.groupby(segments, key=lambda seg: seg[0]):  # equal slopes grow evenly
        left = share_evenly(counts, {head: counts[head] + tokens for _, head, tokens in tied}, left)
    return counts


@dataclass
class Floored(Policy):
    """``inner``'s scores, with the head's top ``share`` of its tokens (rounded up) raised to +inf: under a global
    allocation, the head keeps at least that share and competes for more by ``inner``'s scores (with share 1,
    every token: how a retrieval head keeps its whole context)."""

    name: ClassVar[str] = "floored"
    inner: Policy | None = None
    share: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner is None:
            raise HeadwiseError("floored: needs the policy whose scores it raises")
        self.sinks, self.window = self.inner.sinks, self.inner.window

    def queries_needed(self) -> int | None:
        return self.inner.queries_needed()

    def reconstructs(self) -> bool:
        return self.inner.reconstructs()

    def recent(self, budget: int) -> int:
        return self.inner.recent(budget)

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return self.inner.accumulate(state, attn)

    def score(self, keys, values, state, positions):
        scores = self.inner.score(keys, values, state, positions).float()
        top = torch.topk(scores, math.ceil(self.share * scores.shape[-1]), dim=-1).indices
        return scores.scatter(-1, top, float("inf"))


@dataclass
class HeadAware(Policy):
    """Role-based budgets per KV head from a head profile (see the module docstring).

    Parameters
    ----------
    profile : str
        Path of a ``profile.json`` written by ``headwise profile`` for this model.
    sinks : int
        First tokens every head keeps.
    window : int
        Recent tokens every head keeps (a streaming head keeps only sinks + window); with ``budgets="scores"``
        it is not used (``other`` ranks every token but the sinks, by its own rule).
    other : str
        Policy that ranks tokens in retrieval heads that cannot keep everything and in the other heads.
    retrieval_threshold : float
        KV heads whose retrieval score reaches this are retrieval heads, whatever their profile role.
    budgets : str
        ``"coverage"`` (default): all non-retrieval heads share what the retrieval heads leave by the
        profile's locality curves (the profile needs its locality metrics, which ``headwise profile`` writes);
        ``"roles"``: streaming heads keep sinks + window and the other heads share it; ``"scores"``: by one top-k
        over the scores of ``other`` in every non-retrieval head (needs the plan's ``allocation=global``; see
        the module docstring). Coverage follows the full cache more closely than roles (answer NLL and top-1
        agreement, BENCHMARKS.md).
    retrieval_keep : float
        The share of the context a retrieval head keeps before the other heads get any budget, in (0, 1]: with
        less than 1, its tokens are ranked by ``other`` and the rest of the budget goes to the other heads (with
        ``budgets="scores"``, the share is a floor: the head may win more in the global top-k).
    whole : int
        More KV heads served as retrieval heads (grown to the whole context while the budget allows), those
        with the most attention mass beyond the profile's largest window first (needs its locality metrics).
    """

    name: ClassVar[str] = "headwise"
    profile: str = ""
    sinks: int = 4
    window: int = 64
    other: str = "snapkv"
    retrieval_threshold: float = 0.1
    budgets: str = "coverage"
    retrieval_keep: float = 1.0
    whole: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        from headwise.policies import make_policy

        if not self.profile:
            raise HeadwiseError("policy 'headwise' needs a profile: --profile FILE (from `headwise profile`)")
        if self.other in ("headwise", "full"):
            raise HeadwiseError(f"headwise: other must be a compressing policy, not '{self.other}'")
        if self.budgets not in ("roles", "coverage", "scores"):
            raise HeadwiseError(f"headwise: budgets must be 'roles', 'coverage' or 'scores', not '{self.budgets}'")
        self._profile = HeadProfile.load(self.profile)
        self._other = make_policy(self.other, {"sinks": self.sinks})
        self._streaming = StreamingLLM(sinks=self.sinks)
        if not 0 < self.retrieval_keep <= 1:
            raise HeadwiseError(f"headwise: retrieval_keep must lie in (0, 1], not {self.retrieval_keep}")
        if self.whole < 0:
            raise HeadwiseError(f"headwise: whole must be >= 0, not {self.whole}")
        self._kinds, self._strength = head_kinds(self._profile, self.retrieval_threshold)
        curves = self._coverage_curves() if self.budgets == "coverage" or self.whole else None
        if curves and self.whole:  # attention beyond the largest window: 1 - the last point of the curve
            far = {k: 1.0 - max((m for _, m in curve), default=0.0) for k, curve in curves.items()}
            self._kinds, self._strength = promote_far_heads(self._kinds, self._strength, far, self.whole)
        self._curves = curves if self.budgets == "coverage" else None
        self._memo: tuple[tuple[int, int], dict[tuple[int, int], int]] | None = None

    def _coverage_curves(self) -> dict[tuple[int, int], list[tuple[int, float]]]:
        """Per KV head: (tokens kept, attention mass covered) by the sinks plus each measured recent window."""
        windows = self._profile.settings.get("windows", [])
        n_sink = self._profile.settings.get("n_sink", 0)
        if not windows or any(f"locality_{w}" not in self._profile.kv_metrics for w in windows):
            raise HeadwiseError("headwise: budgets=coverage (the default) and whole need a profile with locality "
                                "metrics; give budgets=roles and no whole for one without")
        return {
            (layer, head): [(n_sink + w, self._profile.kv_metrics[f"locality_{w}"][layer][head]) for w in windows]
            for layer, head in self._kinds
        }

    def bind(self, config) -> None:
        self._profile.check_config(config)

    def kinds(self) -> dict[tuple[int, int], str]:
        """Role used for budgets, per (layer, KV head) of the compressed layers."""
        return dict(self._kinds)

    def allocation(self) -> str | None:
        return "global" if self.budgets == "scores" else "own"

    def min_budget(self) -> int:
        return self.sinks if self.budgets == "scores" else super().min_budget()

    def for_head(self, layer_idx: int, head: int) -> Policy:
        kind = self._kinds[layer_idx, head]
        if self.budgets != "scores":
            ranking = self._streaming if kind == "streaming" else self._other
            return ranking.for_head(layer_idx, head)
        ranking = self._other.for_head(layer_idx, head)
        return Floored(inner=ranking, share=self.retrieval_keep) if kind == "retrieval" else ranking

    def reconstructs(self) -> bool:
        return self._other.reconstructs()

    def head_budgets(self, layer_idx: int, seen: int, budget: int) -> list[int] | None:
        if self.budgets == "scores":
            return None  # the plan's global allocation
        if self._memo is None or self._memo[0] != (seen, budget):
            keys = list(self._kinds)
            curves = [self._curves[k] for k in keys] if self._curves else None
            counts = role_budgets([self._kinds[k] for k in keys], [self._strength[k] for k in keys], seen,
                                  budget * len(keys), self.sinks + self.window, curves,
                                  math.ceil(self.retrieval_keep * seen))
            self._memo = ((seen, budget), dict(zip(keys, counts, strict=True)))
        table = self._memo[1]
        heads = sum(1 for layer, _ in table if layer == layer_idx)
        return [table[layer_idx, h] for h in range(heads)]

    def score(self, keys, values, state, positions):
        raise HeadwiseError("policy 'headwise' scores through its per-head policies (for_head)")
