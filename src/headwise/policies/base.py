"""The contract every compression policy follows.

A policy is a small dataclass of options plus two pure functions over one layer's cache:

* :meth:`Policy.accumulate` folds the attention that a block of new queries paid to the stored keys into a
  running per-token state (only for policies whose scores come from attention);
* :meth:`Policy.score` turns keys, values, that state and the tokens' original positions into one score per
  stored token. The cache keeps the highest scores.

Shapes: ``B`` batch, ``H`` KV heads (the cache calls policies one KV head at a time, so ``H`` is usually 1),
``n`` stored tokens, ``q`` new queries, ``d`` head size. Attention handed to ``accumulate`` is already
averaged over the query heads of each GQA group, so there is one score per KV head.

The cache, not the policy, protects the first ``sinks`` positions and the most recent
:meth:`Policy.recent` tokens (their score becomes +inf), applies budgets, and frees the evicted memory.
To add a method, write one file in this folder with a dataclass subclass and register it in
``policies/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class Policy:
    """Base policy: keep everything it is asked to keep, by a score the subclass defines.

    Parameters
    ----------
    sinks : int
        Number of first positions always kept (attention sinks).
    window : int
        Number of most recent tokens always kept.
    """

    name: ClassVar[str] = ""
    #: False only for the no-compression policy.
    compresses: ClassVar[bool] = True

    sinks: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.window < 0:
            raise ValueError(f"{self.name}: sinks and window must be >= 0")

    def queries_needed(self) -> int | None:
        """How many of the latest queries of a forward pass the score needs attention from.

        0 means none (the score uses keys, values and positions only), k the last k, None all of them.
        """
        return 0

    def recent(self, budget: int) -> int:
        """Most recent tokens to protect when keeping ``budget`` tokens (default: ``window``)."""
        return self.window

    def reconstructs(self) -> bool:
        """True if the attention this policy folds comes from a reconstruction of the context
        (:func:`headwise.dense.reconstruct`, for KVzip) rather than from the prefill's own queries. Such a cache is
        built only from a dense prefill (:func:`headwise.dense.compress`)."""
        return False

    def min_budget(self) -> int:
        """Smallest token budget that this policy can honour (its protected tokens)."""
        return self.sinks + self.window

    def for_head(self, layer_idx: int, head: int) -> Policy:
        """The policy that scores one KV head (a composite policy returns a different one per head)."""
        return self

    def head_budgets(self, layer_idx: int, seen: int, budget: int) -> list[int] | None:
        """Tokens each KV head of a layer keeps, or None to let the plan's allocation decide.

        ``budget`` is the layer's average per head after ``seen`` tokens.
        """
        return None

    def allocation(self) -> str | None:
        """The per-head allocation this policy needs: None (whatever the plan gives), ``"own"`` (it sets every
        head's budget itself, :meth:`head_budgets`) or one of the plan's allocations, which the plan must use."""
        return "own" if type(self).head_budgets is not Policy.head_budgets else None

    def plan_defaults(self) -> dict[str, object]:
        """Plan options this policy is best with (chosen on a dev seed), used where the caller gives none:
        ``{"floor": 0.0}`` for KVzip, say. The options keep their meaning; only their default changes."""
        return {}

    def scores_per_layer(self) -> bool:
        """True if the policy makes one choice per layer: the cache averages the scores of the layer's KV heads
        before selecting, so every head keeps the same tokens (TOVA). False (default): each KV head keeps its
        own top scores. Only the plan's own policy is asked (a composite's per-head policies are not)."""
        return False

    def bind(self, config) -> None:
        """Check the policy fits the model (called when a cache is built for it)."""

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Fold attention ``attn`` [B, H, q, n] of q new, consecutive queries into ``state`` [B, H, n].

        ``state`` holds zeros for tokens stored since the last call. The default ignores attention.
        """
        return state

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One score per stored token, [B, H, n]; higher is kept first."""
        raise NotImplementedError
