"""Shared fixtures: tiny random models of each architecture family, and the real SmolLM2 (session-scoped).

Tiny models are built from configs in code, so every architecture path (GQA, sliding-window layers,
q/k norms) is covered in seconds with no file on disk. Tests that need the real model are marked ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

TINY_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=512)


def tiny_config(arch: str):
    """A small random config: 'llama' (GQA 4:2), 'gemma3' (sliding + full layers), 'qwen3' (q/k norms)."""
    if arch == "llama":
        return LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           **TINY_COMMON)
    if arch == "gemma3":
        return Gemma3TextConfig(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                                **TINY_COMMON)
    if arch == "qwen3":
        return Qwen3Config(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                           **TINY_COMMON)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(params=["llama", "gemma3", "qwen3"])
def tiny(request) -> torch.nn.Module:
    """Each tiny architecture in turn."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded once per test session (from the headwise cache after the first)."""
    from headwise.models import load_model

    return load_model("smollm2-135m")
