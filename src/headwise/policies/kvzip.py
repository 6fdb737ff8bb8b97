"""KVzip: rank the context's tokens by how much the model needs them to rebuild the context.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", NeurIPS 2025.

After the context is prefilled, the model is asked to repeat it and is fed the context again (teacher-forced),
with the context's whole cache in place. A stored token's score is the largest attention any query of that
reconstruction pays it, over the query heads of its KV head's group: a token no part of the copy looks at is
one no question about the context is likely to need. The scores depend on the context alone, so one
compressed cache serves every later question.

The reconstruction is an extra forward of about the context's length, run on the dense prefill
(:func:`headwise.dense.reconstruct`): a cache for this policy is built by :func:`headwise.dense.compress` with
the reconstruction's attention, never by a plain prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy

#: The request that precedes the copy of the context (the paper's wording).
REPEAT = "Repeat the previous context exactly."


def reconstruction_attention(
    query: torch.Tensor, keys: torch.Tensor, n: int, scaling: float, block: int = 256
) -> torch.Tensor:
    """Per KV head, the largest causal attention weight any query pays each of the first ``n`` keys.

    Parameters
    ----------
    query : [B, Hq, m, d]
        Queries of the reconstruction tokens, which sit at positions ``len(keys) - m`` to ``len(keys) - 1``.
    keys : [B, H, N, d]
        Every key the reconstruction attends to: the context's ``n`` first, then the reconstruction's own.
        ``Hq`` is a multiple of ``H`` (grouped-query attention: query heads ``h * Hq / H`` on share KV head h).
    n : int
        Keys to score (the context's).
    scaling : float
        Attention scale (usually ``d ** -0.5``).
    block : int
        Queries per block (memory holds one [B, Hq, block, N] block of weights).

    Returns
    -------
    [B, H, n] float32: the maximum over the group's query heads and over the queries of the softmax weight
    (each query's softmax runs over the keys up to its own position).
    """
    b, hq, m, d = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = hq // kv_heads
    keys_t = keys.float().transpose(-1, -2)  # [B, H, d, N]
    device = query.device
    best = torch.zeros(b, kv_heads, n, device=device)
    for start in range(0, m, block):
        stop = min(m, start + block)
        rows = query[:, :, start:stop].float().reshape(b, kv_heads, group * (stop - start), d) * scaling
        logits = torch.matmul(rows, keys_t).unflatten(2, (group, stop - start))  # [B, H, group, rows, N]
        # causal: query i of the reconstruction sits at position total - m + i and sees the keys up to it
        later = (torch.arange(total - m, total, device=device)[None, :]
                 > torch.arange(total - m + start, total - m + stop, device=device)[:, None])
        logits[..., total - m :].masked_fill_(later, float("-inf"))
        weights = logits.softmax(dim=-1)[..., :n]
        best = torch.maximum(best, weights.amax(dim=(2, 3)))
    return best


@dataclass
class KVzip(Policy):
    """Score = the most attention a token receives while the model repeats the context; built by `headwise bench`.

    Question-agnostic only: the cache comes from the dense prefill (see the module docstring).

    The attention comes from :func:`headwise.dense.reconstruct`, not from the prefill's queries, so the plan's
    ``group_reduce`` does not apply: the paper's maximum over the group is used. As in the paper, the budget is
    split by one top-k over every head of every layer (the plan's ``allocation=global``, set by default; its
    ``floor`` option keeps a share in every head; 0 by default here, the better of 0 and the plan's 0.2 on the
    dev seed). With a uniform budget per head it lost digits of the passkeys (BENCHMARKS.md, issue 14).
    """

    name: ClassVar[str] = "kvzip"

    def reconstructs(self) -> bool:
        return True

    def allocation(self) -> str | None:
        return "global"  # the paper's budgets: scores compared over every head of every layer

    def plan_defaults(self) -> dict[str, object]:
        return {"floor": 0.0}  # dev seed 1 at 90% removed: 0.792 against 0.729 with floor 0.2 (BENCHMARKS.md)

    def accumulate(self, state: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return torch.maximum(state, attn.amax(dim=2))

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return state
