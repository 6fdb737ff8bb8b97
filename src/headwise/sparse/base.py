"""The contract every sparse prefill pattern follows.

A pattern is a small dataclass of options and one function, :meth:`Pattern.layout`, that says which key blocks
each query block of a prefill forward computes (:mod:`headwise.sparse.blocks`); the attention then computes those
blocks only. A pattern may look at the queries and keys to choose (vertical-slash, cumulative mass) or not at all
(A-shape). Below ``min_length`` keys a pattern computes everything: short prompts gain nothing from it.

The cache asks the plan's pattern which pattern each KV head follows (:meth:`Pattern.for_head`), so a sparse
plan (:mod:`headwise.sparse.plan`) gives every head its own, read from a file.

To add a pattern, write one file in this folder with a dataclass subclass and register it in
``sparse/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import HeadwiseError
from headwise.sparse.blocks import causal_layout


@dataclass
class Pattern:
    """Base pattern: which key blocks each query block of a prefill computes.

    Parameters
    ----------
    block : int
        Positions per block, for queries and keys.
    min_length : int
        Keys below which every causal block is computed (the dense path's answer exactly).
    last_dense : int
        The last queries of every forward attend to every causal block: a prompt's question, whose few queries
        cost little and decide the answer (OpenVINO GenAI's ``num_last_dense_tokens_in_prefill``); a forward of
        that many queries or fewer (a question after a sealed context) is dense throughout. Whole query blocks
        are made dense, those holding any of these queries.
    """

    name: ClassVar[str] = ""

    block: int = 64
    min_length: int = 1024
    last_dense: int = 64

    def __post_init__(self) -> None:
        if self.block < 1 or self.min_length < 0 or self.last_dense < 0:
            raise HeadwiseError(f"sparse pattern '{self.name}': block must be >= 1, min_length and last_dense >= 0")

    def layout(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        """The blocks [B, Hq, Qb, Kb] computed for ``query`` [B, Hq, q, d] (at positions ``offset..``) over
        ``key`` [B, Hkv, n, d]: every causal block below ``min_length`` keys, else :meth:`select`'s, with the
        query blocks of the last ``last_dense`` queries dense. :meth:`select` scores in float32 whatever the
        model's precision."""
        b, hq, q, _ = query.shape
        n = key.shape[2]
        dense = causal_layout(b, hq, q, n, self.block, offset).to(query.device)
        if n < self.min_length or q <= self.last_dense:
            return dense
        chosen = self.select(query.float(), key.float(), offset) & dense
        if self.last_dense:
            first = offset // self.block
            tail = (offset + q - self.last_dense) // self.block - first  # the first query block holding them
            chosen[:, :, tail:] = dense[:, :, tail:]
        return chosen

    def select(self, query: torch.Tensor, key: torch.Tensor, offset: int) -> torch.Tensor:
        """The pattern's own blocks (anything past the causal ones is ignored)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The pattern in ``--sparse``'s form, every option spelled out."""
        return f"{self.name}:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    def bind(self, config) -> None:
        """Check the pattern against the model's config before the cache uses it (nothing to check by default)."""

    def for_head(self, layer_idx: int, head: int) -> Pattern | None:
        """The pattern one KV head's query group computes by (None: dense attention); the same for all heads by
        default, one per head for a plan (:mod:`headwise.sparse.plan`)."""
        return self
