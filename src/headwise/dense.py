"""One dense prefill, many compressed caches: capture a context's keys, values and queries once, then build
the cache of any policy and ratio from them.

Why it is exact: while a single-forward prefill runs, a compressed layer attends over *every* token of the
forward and only then evicts (:meth:`headwise.cache.CompressedLayer.attend`), so the hidden states that
reach the next layer, and hence every layer's keys, values and queries, do not depend on the policy. The
tokens a layer keeps depend only on those tensors. :func:`capture` runs the forward once with the
uncompressed headwise cache and records, per layer, the query and mask that its attention received;
:func:`compress` replays each layer's policy on them (:meth:`headwise.cache.CompressedLayer.absorb`), which
gives the very cache that prefilling with that policy would give. The test suite checks that kept positions
and next logits are identical to the direct path.

It holds for a context prefilled in one forward with ``mode="prefill"``. A chunked prefill compresses between
chunks (later chunks see fewer keys) and ``mode="decode"`` compresses while generating: both must take the
direct path (:func:`headwise.generation.prefill` with a cache from :func:`headwise.api.make_cache`).

Memory: the capture holds the uncompressed keys and values plus every layer's queries (for SmolLM2 at 4K
tokens about 0.2 GB and 0.3 GB), for as long as it is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import CacheLayerMixin

import headwise.attention
from headwise.api import make_cache
from headwise.cache import CompressedLayer, HeadwiseCache, Plan
from headwise.compat import forward


@dataclass(frozen=True)
class LayerTensors:
    """What one compressed layer saw in the dense forward: keys and values [B, H, n, d] (after RoPE), the
    queries [B, Hq, n, d], the attention mask its attention function received (None: plain causal) and the
    attention scale."""

    keys: torch.Tensor
    values: torch.Tensor
    query: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float


@dataclass(frozen=True)
class DenseContext:
    """A captured dense prefill: per layer, :class:`LayerTensors` for the layers headwise compresses and the
    transformers cache layer itself for the others (sliding-window layers), plus the last position's logits."""

    layers: tuple[LayerTensors | CacheLayerMixin, ...]
    logits: torch.Tensor
    length: int


class _CapturingLayer(CompressedLayer):
    """An uncompressed layer that also records the query, mask and scale its attention receives."""

    captured: tuple[torch.Tensor, torch.Tensor | None, float] | None = None

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        self.captured = (query, attention_mask, scaling)
        return super().attend(query, attention_mask, scaling)


@torch.inference_mode()
def capture(model: torch.nn.Module, input_ids: torch.Tensor) -> DenseContext:
    """Prefill ``input_ids`` [1, n] in one forward without compression and capture what every layer saw.

    The forward is the one :func:`headwise.generation.prefill` runs with the ``full`` policy (same attention
    code, same ``logits_to_keep``), so its logits equal the full cache's.
    """
    cache = make_cache(model, "full", prompt_length=input_ids.shape[1])
    cache.layers = [
        _CapturingLayer(layer.plan, layer.fraction, layer.layer_idx) if isinstance(layer, CompressedLayer) else layer
        for layer in cache.layers
    ]
    logits = forward(model, cache, input_ids, logits_to_keep=1).logits[:, -1, :]
    layers: list[LayerTensors | CacheLayerMixin] = []
    for layer in cache.layers:
        if isinstance(layer, _CapturingLayer):
            assert layer.captured is not None
            keys = torch.stack([h.keys for h in layer.heads], dim=1)
            values = torch.stack([h.values for h in layer.heads], dim=1)
            layers.append(LayerTensors(keys, values, *layer.captured))
        else:
            layers.append(layer)
    return DenseContext(tuple(layers), logits, input_ids.shape[1])


def compress(model: torch.nn.Module, dense: DenseContext, plan: Plan) -> HeadwiseCache:
    """The cache that prefilling ``dense``'s prompt with ``plan`` would leave (``dense`` is not changed).

    ``plan`` must be in ``prefill`` mode (see the module docstring). Selects the ``"headwise"`` attention on
    ``model``, as :func:`headwise.api.make_cache` does.
    """
    if plan.mode != "prefill":
        raise ValueError("a cache built from a dense prefill must be in prefill mode")
    model.set_attn_implementation(headwise.attention.NAME)
    cache = HeadwiseCache(model.config, plan)
    cache.check_prompt(dense.length)
    for i, (layer, seen) in enumerate(zip(cache.layers, dense.layers, strict=True)):
        if isinstance(layer, CompressedLayer):
            assert isinstance(seen, LayerTensors)
            layer.absorb(seen.keys, seen.values, seen.query, seen.attention_mask, seen.scaling)
        else:
            cache.layers[i] = copy.deepcopy(seen)
    return cache
