"""Head-aware selection from a profile: each KV head reads as far as its role needs.

The decode-time counterpart of the head-aware policy (:mod:`headwise.policies.headwise`), after DuoAttention
(Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"): a
streaming head (profile roles local and sink) never looks far, so it reads only its sinks and recent window;
retrieval and other heads select pages by ``rule`` (Quest by default) within the budget; the first
``dense_layers`` layers, whose heads mix broadly, read every token. The roles come from
:func:`headwise.policies.headwise.head_kinds`, the same classification the policy's budgets use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.errors import HeadwiseError
from headwise.policies.headwise import head_kinds
from headwise.profile.schema import HeadProfile
from headwise.select.base import Choice, RuleState, Selector


@dataclass
class SinksAndWindow(Selector):
    """Read only the first ``sinks`` and the last ``window`` tokens (a streaming head's reads)."""

    name = "sinks_and_window"

    def choose(self, query: torch.Tensor, keys: torch.Tensor, state: RuleState | None) -> Choice:
        n = keys.shape[1]
        if self.sinks + self.window >= n:
            return Choice(None, None)
        index = torch.cat([torch.arange(self.sinks), torch.arange(n - self.window, n)]).to(keys.device)
        return Choice(index.expand(keys.shape[0], -1), None)


@dataclass
class HeadAwareSelect(Selector):
    """Per-head reads from a head profile (streaming heads: sinks and window; others: ``rule``'s pages).

    The first ``dense_layers`` layers read everything.

    ``profile`` is a ``profile.json`` from ``headwise profile`` for this model; KV heads whose retrieval score
    reaches ``retrieval_threshold`` count as retrieval heads whatever their role."""

    name = "roles"

    profile: str = ""
    rule: str = "quest"
    dense_layers: int = 2
    retrieval_threshold: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        from headwise.select import make_selector

        if not self.profile:
            raise HeadwiseError("selection 'roles' needs a profile: profile=FILE (from `headwise profile`)")
        if self.rule == self.name:
            raise HeadwiseError("selection 'roles': rule must be another selection rule")
        if self.dense_layers < 0:
            raise HeadwiseError("selection 'roles': dense_layers must be >= 0")
        self._profile = HeadProfile.load(self.profile)
        self._kinds, _ = head_kinds(self._profile, self.retrieval_threshold)
        shared = {"budget": self.budget, "fraction": self.fraction, "page": self.page, "sinks": self.sinks,
                  "window": self.window}
        self._rule = make_selector(self.rule, shared)
        self._streaming = SinksAndWindow(budget=self.sinks + self.window, sinks=self.sinks, window=self.window)

    def bind(self, config) -> None:
        self._profile.check_config(config)

    def kinds(self) -> dict[tuple[int, int], str]:
        """What each (layer, KV head) reads by: ``"dense"``, ``"streaming"`` or the rule's name."""
        return {key: "dense" if key[0] < self.dense_layers else "streaming" if kind == "streaming" else self.rule
                for key, kind in self._kinds.items()}

    def for_head(self, layer_idx: int, head: int) -> Selector | None:
        if layer_idx < self.dense_layers:
            return None
        return self._streaming if self._kinds[layer_idx, head] == "streaming" else self._rule.for_head(layer_idx, head)

    def choose(self, query: torch.Tensor, keys: torch.Tensor, state: RuleState | None) -> Choice:
        raise HeadwiseError("selection 'roles' reads through its per-head rules (for_head)")
