"""A character-level tokenizer and a tiny LoadedModel, so the whole profiler runs on random models in seconds."""

from __future__ import annotations

import torch

from conftest import tiny_model
from headwise.compat import forward
from headwise.models import LoadedModel
from headwise.registry import ModelInfo


class CharTokenizer:
    """One token per character (code point mod 128); ``<script>`` as the text of token 60 tests escaping."""

    bos_token_id = 1
    eos_token_id = 0
    unk_token_id = None
    all_special_ids = (0, 1)

    def __call__(self, text: str, return_offsets_mapping: bool = False, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) % 126 + 2 for c in text]
        offsets = [(i, i + 1) for i in range(len(text))]
        if add_special_tokens:
            ids, offsets = [self.bos_token_id, *ids], [(0, 0), *offsets]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("<script>" if i == 60 else chr(i - 2) for i in ids if i >= 2)


def tiny_loaded(arch: str = "llama") -> LoadedModel:
    model = tiny_model(arch)
    return LoadedModel(name=f"tiny-{arch}", model=model, tokenizer=CharTokenizer(),
                       info=ModelInfo.from_config(f"tiny-{arch}", model.config), instruct=False, load_seconds=0.0,
                       from_cache=False)


def fake_answer(monkeypatch, lm: LoadedModel) -> None:
    """Make greedy decoding 'answer' by copying the needle digits (a random model never would)."""
    import headwise.profile.profiler as profiler

    real = profiler.needle_task

    def task(tokenizer, n_tokens, seed, *, chat):
        t = real(tokenizer, n_tokens, seed, chat=chat)
        answers[seed] = [t.ids[j] for j in t.needle_positions]
        last[0] = seed
        return t

    def decode(model, logits, cache, *, max_new_tokens, sampling, stop_ids):
        tokens = answers[last[0]]
        for tok in tokens[:-1]:
            forward(model, cache, torch.tensor([[tok]]))
        return tokens

    answers: dict[int, list[int]] = {}
    last = [0]
    monkeypatch.setattr(profiler, "needle_task", task)
    monkeypatch.setattr(profiler, "decode", decode)
