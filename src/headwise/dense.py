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
direct path (:func:`headwise.generation.prefill` with a cache from :func:`headwise.api.make_cache`), and so must a
plan with ``act`` (attention-sink calibration changes the attention, hence the next layers' inputs): it is refused.

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
from headwise.errors import HeadwiseError
from headwise.policies import kvzip


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


def _capturing_cache(model: torch.nn.Module, length: int) -> HeadwiseCache:
    """An uncompressed headwise cache for ``length`` tokens whose compressed layers record what they see."""
    cache = make_cache(model, "full", prompt_length=length)
    cache.layers = [
        _CapturingLayer(layer.plan, layer.fraction, layer.layer_idx) if isinstance(layer, CompressedLayer) else layer
        for layer in cache.layers
    ]
    return cache


def _stacked(layer: _CapturingLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [B, H, n, d] a capturing layer holds."""
    return (torch.stack([h.keys for h in layer.heads], dim=1), torch.stack([h.values for h in layer.heads], dim=1))


@torch.inference_mode()
def capture(model: torch.nn.Module, input_ids: torch.Tensor) -> DenseContext:
    """Prefill ``input_ids`` [1, n] in one forward without compression and capture what every layer saw.

    The forward is the one :func:`headwise.generation.prefill` runs with the ``full`` policy (same attention
    code, same ``logits_to_keep``), so its logits equal the full cache's.
    """
    cache = _capturing_cache(model, input_ids.shape[1])
    logits = forward(model, cache, input_ids, logits_to_keep=1).logits[:, -1, :]
    layers: list[LayerTensors | CacheLayerMixin] = []
    for layer in cache.layers:
        if isinstance(layer, _CapturingLayer):
            assert layer.captured is not None
            layers.append(LayerTensors(*_stacked(layer), *layer.captured))
        else:
            layers.append(layer)
    return DenseContext(tuple(layers), logits, input_ids.shape[1])


@torch.inference_mode()
def reconstruct(model: torch.nn.Module, dense: DenseContext, request: list[int], copy_ids: list[int],
                chunk: int = 2048) -> tuple[torch.Tensor | None, ...]:
    """KVzip's scores of a context (:mod:`headwise.policies.kvzip`): after the context's dense prefill
    (:func:`capture`), feed a ``request`` to repeat it followed by the context's text again (``copy_ids``),
    ``chunk`` tokens of it at a time, each on its own copy of the context's cache (so the reconstruction never
    holds more than the context, the request and one chunk), and return per layer the largest attention each
    context token receives from those queries, per KV head: [1, H, n] for the layers headwise compresses, None
    for the others.

    Attention is taken as plain causal (no padding), as in every model headwise compresses.
    """
    if chunk < 1:
        raise ValueError(f"the reconstruction chunk must be at least 1 token, got {chunk}")
    n = dense.length
    cache = _filled(_capturing_cache(model, n + len(request) + min(chunk, len(copy_ids))), dense)
    best: list[torch.Tensor | None] = [None] * len(cache.layers)
    for start in range(0, len(copy_ids), chunk):
        piece = copy.deepcopy(cache)
        forward(model, piece, torch.tensor([request + copy_ids[start : start + chunk]]), logits_to_keep=1)
        for i, layer in enumerate(piece.layers):
            if isinstance(layer, _CapturingLayer):
                assert layer.captured is not None
                query, _, scaling = layer.captured
                row = kvzip.reconstruction_attention(query, _stacked(layer)[0], n, scaling)
                best[i] = row if best[i] is None else torch.maximum(best[i], row)
    return tuple(best)


def compress(model: torch.nn.Module, dense: DenseContext, plan: Plan,
             reconstruction: tuple[torch.Tensor | None, ...] | None = None) -> HeadwiseCache:
    """The cache that prefilling ``dense``'s prompt with ``plan`` would leave (``dense`` is not changed).

    ``plan`` must be in ``prefill`` mode (see the module docstring). A policy that
    :meth:`~headwise.policies.base.Policy.reconstructs` needs the context's ``reconstruction``
    (:func:`reconstruct`); a plan with ``allocation="global"`` splits its budget over every layer's heads here.
    Selects the ``"headwise"`` attention on ``model``, as :func:`headwise.api.make_cache` does.
    """
    if plan.mode != "prefill":
        raise ValueError("a cache built from a dense prefill must be in prefill mode")
    _refuse_act(plan)
    model.set_attn_implementation(headwise.attention.NAME)
    cache = _filled(HeadwiseCache(model.config, plan), dense, reconstruction)
    cache.allocate()  # a global allocation compares every layer's scores, now all known
    return cache


def prefill(model: torch.nn.Module, ids: list[int], plan: Plan,
            repeat: tuple[list[int], list[int]] | None = None) -> tuple[HeadwiseCache, torch.Tensor]:
    """The cache ``plan`` keeps of the prompt ``ids``, built from its dense prefill, and the logits after its last
    token [1, V]: the way to prefill for a plan that :meth:`~headwise.cache.Plan.needs_dense_prefill`.

    ``repeat`` is what :func:`reconstruct` feeds after the prompt (the request to repeat it, then the text to
    copy, as ids); a policy that reconstructs needs it, and no other policy uses it.
    """
    _refuse_act(plan)
    dense = capture(model, torch.tensor([ids]))
    rows = None
    if plan.policy.reconstructs():
        if repeat is None:
            raise HeadwiseError(f"policy '{plan.policy.name}' needs the request and the text of the context's "
                                "reconstruction")
        rows = reconstruct(model, dense, *repeat)
    return compress(model, dense, plan, rows), dense.logits


def _refuse_act(plan: Plan) -> None:
    """A dense prefill attends without act's calibration, which the cache it builds would then lack."""
    if plan.act is not None:
        raise HeadwiseError("a cache with act (attention-sink calibration) is not built from a dense prefill, which "
                            "attends without calibration: prefill it with headwise.generation.prefill")


def _filled(cache: HeadwiseCache, dense: DenseContext,
            reconstruction: tuple[torch.Tensor | None, ...] | None = None) -> HeadwiseCache:
    """``cache`` (new) after its compressed layers absorbed ``dense``'s tensors and its other layers became
    copies of ``dense``'s."""
    cache.check_prompt(dense.length)
    for i, (layer, seen) in enumerate(zip(cache.layers, dense.layers, strict=True)):
        if isinstance(layer, CompressedLayer):
            assert isinstance(seen, LayerTensors)
            layer.absorb(seen.keys, seen.values, seen.query, seen.attention_mask, seen.scaling,
                         reconstruction[i] if reconstruction else None)
        else:
            cache.layers[i] = copy.deepcopy(seen)
    return cache
