"""Attribution by the retrieval heads: where the heads that copy from the context looked while the answer was made.

Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality") are the few
heads that copy an answer's tokens from the context; ``headwise profile`` finds them. Their attention from the
positions that predict the answer's tokens (the prompt's last position, then each answer token but the last),
averaged over those positions and heads, is a relevance over the prompt's tokens: the copied needle stands out.
Attention rollout, which averages every head of every layer (:mod:`headwise.explain.rollout`), drains into the
first token on SmolLM2 instead (an attention sink), and so does the mean attention of all heads; BENCHMARKS.md
and docs/INTERPRET.md give the ranks measured.

The weights are read as the model used them (:mod:`headwise.explain.lookback`'s ``headwise_weights`` attention):
over a compressed headwise cache, over the tokens each KV head holds. A token a retrieval head evicted gets no
attention from it, so an answer made after the needle was evicted shows where the heads looked instead, and
:attr:`HeadAttention.held` tells which prompt tokens the heads still held. Only single-token forwards are read,
one row per head: memory is linear in the length.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from headwise.compat import forward
from headwise.errors import HeadwiseError
from headwise.explain.lookback import recording
from headwise.explain.rollout import Attribution
from headwise.generation import prefill
from headwise.models import LoadedModel
from headwise.profile.schema import HeadProfile

METHOD = "retrieval heads"


def retrieval_heads(profile: HeadProfile, top: int = 8) -> list[tuple[int, int]]:
    """The profile's retrieval heads (layer, query head); without any, the ``top`` heads by retrieval score."""
    heads = [(layer, head) for layer, row in enumerate(profile.roles) for head, role in enumerate(row)
             if role == "retrieval"]
    if heads:
        return heads
    if "retrieval" not in profile.metrics:
        raise HeadwiseError("the profile has no retrieval heads and no retrieval scores: profile with needle runs")
    scores = torch.nan_to_num(profile.metric("retrieval"), nan=-1.0).flatten()
    best = scores.argsort(descending=True)[:top].tolist()
    return sorted((i // profile.num_heads, i % profile.num_heads) for i in best)


@dataclass
class HeadAttention:
    """The attention that chosen query heads paid to the prompt's positions over the recorded steps.

    ``heads`` maps a layer to its chosen query heads; ``group`` is the query heads per KV head; ``first`` the
    position of the first recorded query. ``relevance[p]`` sums the chosen heads' weights on prompt position
    ``p`` (``p < prompt_length``) over the steps; ``held[p]`` counts the (head, step) pairs whose cache held it.
    """

    heads: dict[int, list[int]]
    group: int
    prompt_length: int
    first: int
    steps: int = 0
    relevance: torch.Tensor = field(init=False)
    held: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.relevance = torch.zeros(self.prompt_length, dtype=torch.float64)
        self.held = torch.zeros(self.prompt_length, dtype=torch.float64)

    def next_query(self) -> None:
        self.steps += 1

    @property
    def position(self) -> int:
        return self.first + self.steps - 1

    def add(self, layer: int, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for head in self.heads.get(layer, ()):
            probs, positions = weights[head // self.group]
            row, where = probs[0, head % self.group, 0].double(), positions[0].long()
            inside = (where >= 0) & (where < self.prompt_length)  # not a summary token, not a question token
            self.relevance.index_add_(0, where[inside], row[inside])
            self.held.index_add_(0, where[inside], torch.ones_like(row[inside]))


@torch.inference_mode()
def head_attention(lm: LoadedModel, cache, tail: Sequence[int], answer: Sequence[int],
                   heads: Sequence[tuple[int, int]]) -> HeadAttention:
    """The attention of ``heads`` on the prompt (cache's tokens plus ``tail``) while ``answer`` is teacher-forced
    a token at a time after ``tail`` on a copy of ``cache``: from the tail's last position and every answer token
    but the last, the steps that predicted the answer."""
    if not tail:
        raise HeadwiseError("the tail must hold at least the prompt's last token")
    cache = copy.deepcopy(cache)
    if len(tail) > 1:
        prefill(lm.model, torch.tensor([list(tail[:-1])]), cache)
    prompt_length = cache.get_seq_length() + 1
    chosen: dict[int, list[int]] = {}
    for layer, head in heads:
        chosen.setdefault(layer, []).append(head)
    recorder = HeadAttention(chosen, lm.info.num_heads // lm.info.num_kv_heads, prompt_length, prompt_length - 1)
    with recording(lm.model, recorder):
        for token in [tail[-1], *answer[:-1]]:
            recorder.next_query()
            forward(lm.model, cache, torch.tensor([[token]]))
    return recorder


def retrieval_attribution(lm: LoadedModel, cache, context: Sequence[int], tail: Sequence[int],
                          answer: Sequence[int], heads: Sequence[tuple[int, int]]) -> tuple[Attribution, list[float]]:
    """An :class:`~headwise.explain.rollout.Attribution` of ``answer`` to the prompt ``context + tail`` by the
    attention of ``heads`` (:func:`retrieval_heads`) over ``cache`` (sealed, holding ``context``), and per prompt
    token the share of (head, step) pairs whose cache held it (1.0 everywhere for a full cache).

    The first token is an attention sink: its weight is left out of the relevance, which sums to 1 over the
    rest of the prompt; ``answer_share`` is the share of the heads' attention that went elsewhere than the
    prompt (the answer's own tokens, or a compensation summary)."""
    start = time.perf_counter()
    recorded = head_attention(lm, cache, tail, answer, heads)
    pairs = recorded.steps * len(heads)
    on_prompt = recorded.relevance.clone()
    on_prompt[0] = 0.0
    total = float(on_prompt.sum())
    relevance = (on_prompt / total if total > 0 else on_prompt).tolist()
    ids = list(context) + list(tail)
    attribution = Attribution(
        model=lm.name, method=METHOD, tokens=[lm.tokenizer.decode([t]) for t in ids], relevance=relevance,
        answer=lm.tokenizer.decode(list(answer), skip_special_tokens=True),
        targets=list(range(len(ids) - 1, len(ids) + len(answer) - 1)),
        answer_share=1.0 - float(recorded.relevance.sum()) / pairs, seconds=time.perf_counter() - start,
    )
    return attribution, (recorded.held / pairs).tolist()


@torch.inference_mode()
def answer_and_attribute(lm: LoadedModel, ids: Sequence[int], heads: Sequence[tuple[int, int]], cache, *,
                         answer: Sequence[int] | None = None, max_new_tokens: int = 32
                         ) -> tuple[Attribution, list[float]]:
    """Prefill all of ``ids`` but its last token into ``cache`` (compressing as its plan says), answer greedily on
    a copy of it unless ``answer`` is given (an end token is dropped), and attribute the answer by ``heads``
    (:func:`retrieval_attribution`)."""
    from headwise.generation import Sampling, decode, stop_token_ids

    context, tail = list(ids[:-1]), list(ids[-1:])
    if not context:
        raise HeadwiseError("the prompt needs at least two tokens")
    prefill(lm.model, torch.tensor([context]), cache)
    if hasattr(cache, "seal"):
        cache.seal()
    if answer is None:
        work = copy.deepcopy(cache)
        logits = prefill(lm.model, torch.tensor([tail]), work)
        stops = stop_token_ids(lm)
        answer = decode(lm.model, logits, work, max_new_tokens=max_new_tokens, sampling=Sampling(), stop_ids=stops)
        answer = answer[:-1] if answer and answer[-1] in stops else answer
    return retrieval_attribution(lm, cache, context, tail, answer, heads)
