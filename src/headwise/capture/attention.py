"""The ``headwise_capture`` attention function and the context manager that selects it.

The function returns exactly what transformers' own ``sdpa`` implementation returns (it calls it), then
recomputes the attention probabilities block by block over queries to feed an
:class:`~headwise.capture.stats.AttentionRecorder`. Only public extension points are used:
``AttentionInterface.register``, ``AttentionMaskInterface.register`` (with transformers' SDPA mask function,
so the causal and sliding-window masks are built as for ``sdpa``; see :func:`headwise.attention.register`) and
``model.set_attn_implementation``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from contextvars import ContextVar

import torch

from headwise.attention import register as register_attention
from headwise.attention import sdpa_attention, selected
from headwise.capture.stats import AttentionRecorder, CaptureSettings
from headwise.errors import HeadwiseError

CAPTURE_NAME = "headwise_capture"

_ACTIVE: ContextVar[AttentionRecorder | None] = ContextVar("headwise_capture_recorder", default=None)


def _allowed_keys(
    attention_mask: torch.Tensor | None, q_pos: torch.Tensor, kv_len: int, start: int, stop: int
) -> torch.Tensor:
    """Boolean ``[block, keys]`` of keys each query may attend to.

    ``sdpa_mask`` returns None when a plain causal mask suffices (``sdpa`` then uses ``is_causal``); a float
    mask is additive (a very negative value means masked).
    """
    if attention_mask is None:
        return torch.arange(kv_len)[None, :] <= q_pos[:, None]
    block = attention_mask[0, 0, start:stop, :kv_len]
    if block.dtype == torch.bool:
        return block
    return block > torch.finfo(block.dtype).min / 2


def capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention output of ``sdpa`` plus block-wise statistics for the active recorder.

    Shapes follow transformers: ``query`` ``[batch, heads, q_len, dim]``, ``key``/``value``
    ``[batch, kv_heads, kv_len, dim]``. Query head ``h`` reads KV head ``h // (heads // kv_heads)`` (GQA).
    Queries are the last ``q_len`` positions of the ``kv_len`` keys (prefill after a cache prefix, or decoding).
    Sliding-window layers get their window through ``attention_mask`` (built by ``sdpa_mask``). Positions are
    indices into the keys the layer holds: absolute positions for a full cache, offsets into the last ``kv_len``
    positions for a sliding-window cache layer after it has dropped old keys.
    """
    output, _ = sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    recorder = _ACTIVE.get()
    if recorder is None:
        return output, None
    if query.shape[0] != 1:
        raise HeadwiseError(f"attention capture supports batch size 1, got {query.shape[0]}")
    heads, q_len, dim = query.shape[1:]
    kv_heads, kv_len = key.shape[1:3]
    if heads % kv_heads:
        raise HeadwiseError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    scale = scaling if scaling is not None else dim**-0.5
    keys = key[0].float().repeat_interleave(heads // kv_heads, dim=0)  # [heads, kv_len, dim]
    first = kv_len - q_len
    stats = recorder.layer(module.layer_idx, heads)
    step = recorder.settings.block_for(heads, kv_len)
    with torch.no_grad():
        for start in range(0, q_len, step):
            stop = min(start + step, q_len)
            q_pos = torch.arange(first + start, first + stop)
            allowed = _allowed_keys(attention_mask, q_pos, kv_len, start, stop)
            width = first + stop  # causal: keys after the block's last query get no attention
            if allowed[:, width:].any():
                width = kv_len
            allowed = allowed[:, :width]
            scores = torch.matmul(query[0, :, start:stop].float(), keys[:, :width].transpose(1, 2)) * scale
            probs = scores.masked_fill_(~allowed, float("-inf")).softmax(-1)
            del scores
            stats.add_block(probs, allowed, q_pos, recorder.targets_for(q_pos), map_len=kv_len if first == 0 else None,
                            key_len=kv_len)
    return output, None


def register() -> None:
    """Register ``headwise_capture`` with transformers' attention and mask interfaces (idempotent)."""
    register_attention(CAPTURE_NAME, capture_attention)


def capture(model: torch.nn.Module, settings: CaptureSettings | None = None
            ) -> AbstractContextManager[AttentionRecorder]:
    """Run ``model`` with the capture attention inside the block; yield the recorder that fills up. Afterwards the
    model is on headwise's own attention (:func:`headwise.attention.selected`)."""
    register()
    return selected(model, CAPTURE_NAME, _ACTIVE, AttentionRecorder(settings or CaptureSettings()))
