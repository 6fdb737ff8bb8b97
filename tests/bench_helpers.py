"""Test helpers for the benchmark: a word-level tokenizer and a tiny Llama that reads it (no files needed)."""

from __future__ import annotations

import re
import zlib

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headwise.models import LoadedModel
from headwise.registry import ModelInfo

WORD = re.compile(r"\w+|[^\w\s]")
VOCAB = 256


def count_words(text: str) -> int:
    """Token count of the word-level tokenizer (close to a BPE tokenizer's count on English prose)."""
    return len(WORD.findall(text))


class WordTokenizer:
    """Words and punctuation hashed into a 256-entry vocabulary; ids 0 and 1 are end-of-sequence and unknown."""

    eos_token_id = 0
    unk_token_id = 1
    bos_token_id = None
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict:
        words = list(WORD.finditer(text))
        out: dict = {"input_ids": [2 + zlib.crc32(w.group().encode()) % (VOCAB - 2) for w in words]}
        if return_offsets_mapping:
            out["offset_mapping"] = [w.span() for w in words]
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids if i > 1)


def tiny_lm(context_length: int = 4096) -> LoadedModel:
    """A 2-layer random Llama (GQA 4:2) with the word tokenizer, as a :class:`LoadedModel`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=context_length, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return LoadedModel(name="tiny-llama", model=model, tokenizer=WordTokenizer(),
                       info=ModelInfo.from_config("tiny-llama", config), instruct=False, load_seconds=0.0,
                       from_cache=False)
