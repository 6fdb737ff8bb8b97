"""The ``"headwise"`` attention function, registered with transformers' public ``AttentionInterface``.

For a layer of a :class:`~headwise.cache.HeadwiseCache` it attends over the kept tokens of each KV head
(see :meth:`headwise.cache.CompressedLayer.attend`); for anything else (sliding-window layers, a plain
``DynamicCache``, no cache) it is transformers' own SDPA attention, so selecting it is always safe.
Its mask function is transformers' ``sdpa_mask``, registered under the same name: without a registered
mask function transformers would silently drop the causal mask.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headwise.cache import take_handoff

NAME = "headwise"


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
    layer = take_handoff(key)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(query, attention_mask, scale), None


AttentionInterface.register(NAME, headwise_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
