"""Lookback ratios: how much each head looks back at the context while the model generates.

Lookback Lens (Chuang et al. 2024, "Lookback Lens: Detecting and Mitigating Contextual Hallucinations in Large
Language Models Using Only Attention Maps") detects answers the context does not support from one number per
head and generated token, the *lookback ratio*

    LR = A_ctx / (A_ctx + A_new),

where ``A_ctx`` is the head's mean attention weight over the context (every prompt token) and ``A_new`` its
mean weight over the tokens generated so far (the current one included). A linear probe on the ratios
averaged over a span (:mod:`headwise.explain.probe`) tells supported spans from unsupported ones.

Here the ratio of the step that generates token ``t`` is read from the decoding forward whose query is token
``t - 1``, as generation computes it: an answer of ``T`` tokens gives ``T - 1`` rows (the first token is
predicted from the prompt's last position, where nothing has been generated yet and the ratio is 1 by
definition). The weights are those the model used: over the tokens a compressed headwise cache holds, per KV
head (:meth:`headwise.cache.CompressedLayer.attention_weights`), and over the window of a sliding-window layer.
Only single-token forwards are read, one row of ``n`` weights per head, never an ``n x n`` map.

The attention function ``headwise_weights`` is registered with transformers' public ``AttentionInterface``
(its mask is SDPA's) and computes the same output as ``headwise``, handing the weights of every single-token
forward to a recorder (:class:`LookbackRecorder` here; :mod:`headwise.explain.retrieval` has another);
:func:`recording` selects it for a block.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from headwise.attention import register, sdpa_attention, selected
from headwise.cache import take_handoff
from headwise.errors import HeadwiseError
from headwise.generation import Sampling, decode, prefill, stop_token_ids
from headwise.models import LoadedModel

NAME = "headwise_weights"


def lookback_ratio(probs: torch.Tensor, is_context: torch.Tensor) -> torch.Tensor:
    """The lookback ratio of attention rows ``probs`` [..., m] over keys of which ``is_context`` [m] (bool) are
    context tokens and the rest generated ones; both sets must be non-empty."""
    n_context = int(is_context.sum())
    if n_context == 0 or n_context == is_context.numel():
        raise ValueError("the keys must hold both context and generated tokens")
    context = probs.masked_fill(~is_context, 0.0).sum(-1) / n_context
    new = probs.masked_fill(is_context, 0.0).sum(-1) / (is_context.numel() - n_context)
    return context / (context + new)


def group_probs(query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Softmax attention [B, G, q, m] (float32) of a query group [B, G, q, d] over one KV head's keys
    [B, 1, m, d]; ``mask`` is boolean (True: attend) or additive, broadcastable to the scores."""
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(dim=-1)


def dense_weights(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, position: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per KV head, the weights of a single query at ``position`` over a transformers cache layer's keys
    [B, H, m, d] (the last ``m`` positions up to the query's: all of them, or a sliding window) and the keys'
    positions [B, m]."""
    b, kv_heads, m, _ = key.shape
    group = query.shape[1] // kv_heads
    mask = None if attention_mask is None else attention_mask[:, :, -1:, -m:]
    positions = torch.arange(position - m + 1, position + 1).expand(b, m)
    return [(group_probs(query[:, h * group : (h + 1) * group], key[:, h : h + 1], mask, scaling), positions)
            for h in range(kv_heads)]


@dataclass
class LookbackRecorder:
    """Lookback ratios of the decoding steps after a prompt of ``prompt_length`` tokens.

    :meth:`next_query` announces each generated token before its forward; the attention function then adds
    one row per layer: ``rows[k][layer]`` holds the ratio of every query head at the forward of token ``k``.
    """

    prompt_length: int
    rows: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def next_query(self) -> None:
        self.rows.append({})

    @property
    def position(self) -> int:
        """The position of the query being recorded."""
        return self.prompt_length + len(self.rows) - 1

    def add(self, layer: int, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record one layer's ratios from its per-KV-head weights [1, G, 1, m] and key positions [1, m]."""
        if not self.rows:
            raise HeadwiseError("a decoding step ran before next_query() announced its token")
        ratios = [lookback_ratio(probs[0, :, 0], positions[0] < self.prompt_length) for probs, positions in weights]
        self.rows[-1][layer] = torch.cat(ratios)

    def ratios(self) -> torch.Tensor:
        """The recorded ratios [steps, layers, query heads] (float32); a last token announced but never fed (the
        end of an answer) has no row."""
        rows = self.rows[:-1] if self.rows and not self.rows[-1] else self.rows
        if not rows:
            return torch.zeros(0, 0, 0)
        layers = sorted(rows[0])
        if any(sorted(row) != layers for row in rows):
            raise HeadwiseError("a decoding step recorded other layers than the first: was the forward interrupted?")
        return torch.stack([torch.stack([row[layer] for layer in layers]) for row in rows]).float()


class WeightsRecorder(Protocol):
    """What :func:`weights_attention` hands the weights of each single-token forward to."""

    @property
    def position(self) -> int:
        """The position of the query being recorded."""
        ...

    def add(self, layer: int, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Take one layer's per-KV-head weights [1, G, 1, m] and key positions [1, m]."""
        ...


R = TypeVar("R", bound=WeightsRecorder)
_ACTIVE: ContextVar[WeightsRecorder | None] = ContextVar("headwise_weights_recorder", default=None)


def weights_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``headwise`` attention, handing the weights of single-token forwards (batch size 1) to the active
    recorder."""
    layer = take_handoff(module, key)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    recorder = _ACTIVE.get()
    if recorder is not None and query.shape[2] == 1:
        if query.shape[0] != 1:
            raise HeadwiseError(f"attention weights are recorded for batch size 1, got {query.shape[0]}")
        weights = (layer.attention_weights(query, attention_mask, scale) if layer is not None
                   else dense_weights(query, key, attention_mask, scale, recorder.position))
        recorder.add(module.layer_idx, weights)
    if layer is None:
        return sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return layer.attend(query, attention_mask, scale), None


register(NAME, weights_attention)


def recording(model: torch.nn.Module, recorder: R) -> AbstractContextManager[R]:
    """Select ``headwise_weights`` on ``model`` for the block and yield ``recorder``, which its single-token
    forwards fill (:func:`headwise.attention.selected`)."""
    return selected(model, NAME, _ACTIVE, recorder)


@dataclass(frozen=True)
class Traced:
    """A greedy answer and the lookback ratios [T - 1, layers, heads] of the steps that generated its tokens
    after the first."""

    tokens: list[int]
    text: str
    ratios: torch.Tensor


@torch.inference_mode()
def traced_answer(lm: LoadedModel, cache, tail: list[int], max_new_tokens: int) -> Traced:
    """Answer on a copy of the sealed ``cache`` (feed ``tail``, decode greedily, as
    :func:`headwise.bench.protocol.answer` does) while recording lookback ratios."""
    cache = copy.deepcopy(cache)
    logits = prefill(lm.model, torch.tensor([tail]), cache)
    with recording(lm.model, LookbackRecorder(cache.get_seq_length())) as recorder:
        tokens = decode(lm.model, logits, cache, max_new_tokens=max_new_tokens, sampling=Sampling(),
                        stop_ids=stop_token_ids(lm), on_token=lambda _: recorder.next_query())
    text = lm.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return Traced(tokens, text, recorder.ratios())


@torch.inference_mode()
def forced_ratios(lm: LoadedModel, cache, tail: list[int], answer: list[int]) -> torch.Tensor:
    """The lookback ratios [len(answer) - 1, layers, heads] of a given answer, teacher-forced a token at a time
    after ``tail`` on a copy of ``cache``: the same steps as generating it."""
    from headwise.compat import forward

    cache = copy.deepcopy(cache)
    prefill(lm.model, torch.tensor([tail]), cache)
    with recording(lm.model, LookbackRecorder(cache.get_seq_length())) as recorder:
        for token in answer[:-1]:
            recorder.next_query()
            forward(lm.model, cache, torch.tensor([[token]]))
    return recorder.ratios()
