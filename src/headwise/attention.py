"""The ``"headwise"`` attention function, registered with transformers' public ``AttentionInterface``.

For a layer of a :class:`~headwise.cache.HeadwiseCache` it attends over the kept tokens of each KV head
(see :meth:`headwise.cache.CompressedLayer.attend`); for anything else (sliding-window layers, a plain
``DynamicCache``, no cache) it is transformers' own SDPA attention, so selecting it is always safe.
Its mask function is transformers' SDPA mask, registered under the same name: without a registered
mask function transformers would silently drop the causal mask.

Both of transformers' functions are looked up by name in its public registries (``AttentionInterface()``
and ``AttentionMaskInterface()``, which map ``"sdpa"`` to them), never imported from its internal modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from headwise.cache import take_handoff

NAME = "headwise"


def sdpa_attention() -> Callable:
    """transformers' SDPA attention function, from its public registry."""
    return AttentionInterface()["sdpa"]


def register(name: str, function: Callable) -> None:
    """Register an attention function under ``name``, with the SDPA mask function (causal, sliding windows)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, AttentionMaskInterface()["sdpa"])


def headwise_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer: over a compressed layer's kept tokens, or plain SDPA otherwise."""
    layer = take_handoff(module, key)
    if layer is None:
        return sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, attention_mask, scale), None


register(NAME, headwise_attention)

T = TypeVar("T")


@contextmanager
def selected(model: torch.nn.Module, name: str, active: ContextVar[T | None], value: T) -> Iterator[T]:
    """Run ``model`` with the attention registered as ``name`` inside the block, with ``active`` set to ``value``
    (the recorder that attention fills); yield ``value``. On exit, also after an exception, the variable is reset
    and the model is left on headwise's own attention (``"headwise"``, transformers' SDPA for any cache but a
    headwise one): transformers has no public getter for the previous implementation."""
    model.set_attn_implementation(name)
    token = active.set(value)
    try:
        yield value
    finally:
        active.reset(token)
        model.set_attn_implementation(NAME)
