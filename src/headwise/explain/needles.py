"""Where the needle went: which KV heads of a compressed cache still hold the tokens an answer is read from.

A compressed answer can be wrong because the heads that copy the answer evicted the needle, or because they
kept it and something else failed (another head that finds the right needle lost its key, say). The benchmark
records, for every answer of a compressed headwise cache, the share of the needle's tokens each KV head holds
(:func:`needle_kept`); the report draws it per head for wrong and for right answers. The needle's tokens are those
of every occurrence of an answer string in the context (:func:`needle_positions`), found through the tokenizer's
character offsets of the prompt's context piece (:func:`headwise.bench.protocol.prompt_parts`).
"""

from __future__ import annotations

import re

import torch

from headwise.bench.tasks import Sample
from headwise.generation import build_prompt
from headwise.models import LoadedModel


def _spans(context: str, answers: list[str]) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for a in answers if a for m in re.finditer(re.escape(a), context)]


def overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the tokens whose character ``offsets`` overlap one of ``spans`` (half-open ranges)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and any(s < b and e > a for a, b in spans)]


def needle_positions(lm: LoadedModel, sample: Sample) -> list[int]:
    """Positions, in the prompt's context piece, of the tokens of every occurrence of an answer in the context;
    empty when the tokenizer gives no character offsets or the pieces do not line up."""
    tok = lm.tokenizer
    spans = _spans(sample.context, sample.answers)
    if not spans:
        return []
    if lm.instruct and getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True,
                                           tokenize=False)
        start = rendered.index(sample.context)
        text, shift = rendered[: start + len(sample.context)], start
        prefix = 0
    else:
        text, shift = sample.context, 0
        bare = tok(text, add_special_tokens=False)["input_ids"]
        prefix = len(build_prompt(lm, sample.context, chat=False)) - len(bare)  # a BOS token
    try:
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a slow tokenizer has no offsets
        return []
    return [prefix + i for i in overlapping(list(offsets), [(a + shift, b + shift) for a, b in spans])]


def needle_kept(held: dict[int, list[torch.Tensor]], needle: list[int]) -> dict[str, list[float]]:
    """Per compressed layer (by its index, as a string for JSON) and KV head, the share of ``needle``'s positions
    that head holds."""
    wanted = torch.tensor(sorted(set(needle)), dtype=torch.long)
    return {str(layer): [round(float(torch.isin(wanted, positions).float().mean()), 4) for positions in heads]
            for layer, heads in held.items()}
