"""Attribution of an answer to the context tokens: attention rollout and attention flow.

Both methods come from Abnar and Zuidema 2020, "Quantifying Attention Flow in Transformers" (ACL). Each layer
``l`` is summarised by its head-averaged attention ``A_l`` (rows: queries, columns: keys) with the residual
connection added as an identity, ``W_l = 0.5 * A_l + 0.5 * I``:

- *rollout* multiplies these matrices, ``W_L @ ... @ W_1``; the row of a target position is the share of that
  position's top-layer representation that traces back to each input token;
- *flow* treats the layers as a graph whose edges from layer ``l`` to ``l - 1`` have capacities ``W_l`` and
  takes, for each input token, the maximum flow from the target at the top to that token at the bottom.

Rollout never builds a matrix: the target's row vector ``r`` is carried back from the last layer to the first,
``r <- r @ W_l``, and ``r @ A_l`` is recomputed from the layer's queries and keys one block of query rows at a
time (:func:`layer_attention_rows`), so memory is ``O(block * n)`` per layer plus the stored queries and keys,
``O(n)``: it runs at 8K tokens. Flow needs every ``W_l`` in full and one max-flow per token, so it is limited to
:data:`FLOW_MAX_TOKENS` tokens.

The queries and keys come from one forward pass (no cache, ``logits_to_keep=1``) through an attention function
registered with transformers' public ``AttentionInterface`` (:func:`capture_qk`): it returns transformers' own
SDPA output and keeps each layer's post-RoPE queries and keys, plus the sliding window its mask encodes (Gemma 3's
local layers), read from the mask itself block by block.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from headwise.attention import register, sdpa_attention, selected
from headwise.errors import HeadwiseError
from headwise.models import LoadedModel

if TYPE_CHECKING:
    from scipy.sparse import csr_array

NAME = "headwise_rollout"

#: The longest input :func:`attention_flow` takes: its graph has ``layers * n**2 / 2`` edges and it solves one
#: max-flow per token, so its time grows as ``n**3`` (2 s of CPU at 128 tokens for SmolLM2's 30 layers).
FLOW_MAX_TOKENS = 128

#: Float32 elements of attention scores one block of query rows may hold (64 MiB): the block size for ``n`` keys
#: and ``h`` heads is ``BLOCK_ELEMENTS // (h * n)`` rows.
BLOCK_ELEMENTS = 2**24

METHODS = ("rollout", "flow")


@dataclass
class LayerQK:
    """One layer's post-RoPE queries ``[heads, n, dim]`` and keys ``[kv_heads, n, dim]`` for ``n`` positions, the
    softmax ``scale``, and the sliding ``window`` of its mask (None: plain causal).

    Query head ``h`` reads KV head ``h // (heads // kv_heads)`` (grouped-query attention). A key ``j`` is visible
    to query ``i`` when ``i - window < j <= i`` (transformers' sliding-window mask).
    """

    query: torch.Tensor
    key: torch.Tensor
    scale: float
    window: int | None = None


def default_block(heads: int, n: int) -> int:
    """Query rows per block so that one block's scores over ``n`` keys hold at most :data:`BLOCK_ELEMENTS`."""
    return max(1, BLOCK_ELEMENTS // max(1, heads * n))


def visible(positions: torch.Tensor, lo: int, hi: int, window: int | None) -> torch.Tensor:
    """Boolean ``[len(positions), hi - lo]``: which keys ``lo..hi-1`` each query position may attend to."""
    keys = torch.arange(lo, hi)[None, :]
    allowed = keys <= positions[:, None]
    if window is not None:
        allowed &= keys > positions[:, None] - window
    return allowed


def head_mean_attention(
    q: torch.Tensor, k: torch.Tensor, scale: float, positions: torch.Tensor, window: int | None = None
) -> tuple[torch.Tensor, int]:
    """Head-averaged causal softmax attention of the query ``positions`` (sorted) over the keys they may see.

    Returns ``(rows, lo)``: ``rows[i, j]`` is the attention of query ``positions[i]`` to key ``lo + j``, for the
    keys from ``lo`` (the first any of them sees) to ``max(positions)``; later keys get none (causal). Scores are
    computed in float32 per group of query heads sharing a KV head, never repeating the keys.
    """
    heads, kv_heads, dim = q.shape[0], k.shape[0], q.shape[-1]
    if heads % kv_heads:
        raise HeadwiseError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    first, last = int(positions[0]), int(positions[-1])
    lo = 0 if window is None else max(0, first - window + 1)
    hi = last + 1
    b = positions.numel()
    queries = q[:, positions].float().reshape(kv_heads, heads // kv_heads * b, dim)
    scores = torch.matmul(queries, k[:, lo:hi].float().transpose(1, 2)).mul_(scale)
    scores = scores.view(heads, b, hi - lo).masked_fill_(~visible(positions, lo, hi, window), float("-inf"))
    scores -= scores.amax(-1, keepdim=True)  # softmax in place: one block of scores in memory, not two
    scores.exp_()
    scores /= scores.sum(-1, keepdim=True)
    return scores.mean(0), lo


def layer_attention_rows(
    r: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """``r @ A`` for the layer's head-averaged attention ``A`` (``n x n``), computed block by block.

    Only the query rows where ``r`` is non-zero are computed, ``block`` at a time (default
    :func:`default_block`), each over the keys it may see: memory is ``O(block * n)``, never ``n x n``.

    Parameters
    ----------
    r
        ``[n]`` weights of the query positions.
    q, k
        ``[heads, n, dim]`` queries and ``[kv_heads, n, dim]`` keys of the same ``n`` positions.
    scale
        The softmax scale (``dim ** -0.5`` for most models).
    window
        The sliding window of the layer's mask, or None for plain causal attention.
    """
    n = k.shape[1]
    if q.shape[1] != n or r.shape != (n,):
        raise HeadwiseError(f"queries ({q.shape[1]}), keys ({n}) and weights {tuple(r.shape)} must cover the same "
                            "positions")
    step = block or default_block(q.shape[0], n)
    rows = torch.nonzero(r).flatten()
    out = torch.zeros(n, dtype=torch.float32)
    for start in range(0, rows.numel(), step):
        positions = rows[start : start + step]
        attention, lo = head_mean_attention(q, k, scale, positions, window)
        out[lo : lo + attention.shape[1]] += r[positions].float() @ attention
    return out


def rollout_step(r: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One layer of rollout: ``r @ (0.5 * A + 0.5 * I)`` from ``rows = r @ A``, renormalised to sum to 1.

    The identity is the residual connection, weighted equally with attention as in Abnar and Zuidema (2020).
    """
    out = 0.5 * rows + 0.5 * r
    return out / out.sum()


def target_row(n: int, targets: Sequence[int] | None) -> torch.Tensor:
    """The starting row: the mean of one-hot rows at ``targets`` (default: the last position)."""
    targets = [n - 1] if targets is None else list(targets)
    if not targets or min(targets) < 0 or max(targets) >= n:
        raise HeadwiseError(f"target positions must be a non-empty set within 0..{n - 1}, got {targets}")
    r = torch.zeros(n, dtype=torch.float32)
    r[targets] = 1.0 / len(targets)
    return r


def rollout(layers: Sequence[LayerQK], targets: Sequence[int] | None = None, *, block: int | None = None
            ) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020) of the ``targets`` (default: the last position) to the inputs.

    The mean of the targets' one-hot rows is carried back from the last layer to the first through
    :func:`rollout_step`; the result (``[n]``, sums to 1) is the share of the targets' top-layer representation
    that traces back to each input token. Equal to the targets' mean row of ``W_L @ ... @ W_1`` with
    ``W_l = 0.5 * A_l + 0.5 * I``, without building any ``W_l``.
    """
    r = target_row(layers[0].key.shape[1], targets)
    for layer in reversed(layers):
        r = rollout_step(r, layer_attention_rows(r, layer.query, layer.key, layer.scale, layer.window, block))
    return r


def check_flow_length(n: int, what: str = "") -> None:
    """Refuse attention flow for more than :data:`FLOW_MAX_TOKENS` tokens (``what``: where the ``n`` comes from)."""
    if n > FLOW_MAX_TOKENS:
        raise HeadwiseError(f"attention flow takes at most {FLOW_MAX_TOKENS} tokens (one max-flow per token over a "
                            f"graph of layers x n^2 edges), got {n}{what}: use rollout (--method rollout), which runs "
                            "at 8K")


def flow_graph(matrices: Sequence[torch.Tensor], targets: Sequence[int], resolution: int) -> csr_array:
    """The layered graph of attention flow as a sparse matrix of integer capacities (no edge of capacity 0).

    Node ``l * n + i`` is position ``i`` at layer ``l`` (0: the input tokens, ``L``: the top); an edge from
    ``(l, i)`` to ``(l - 1, j)`` has capacity ``matrices[l - 1][i, j]`` scaled by ``resolution`` and rounded.
    The extra node ``(L + 1) * n``, the source, feeds each target at the top with capacity ``1 / len(targets)``.
    """
    import numpy as np
    from scipy.sparse import csr_array

    n = matrices[0].shape[0]
    top = len(matrices)
    sources, sinks, capacities = [], [], []
    for layer, matrix in enumerate(matrices, start=1):
        i, j = torch.nonzero(matrix, as_tuple=True)
        sources.append(layer * n + i.numpy())
        sinks.append((layer - 1) * n + j.numpy())
        capacities.append(matrix[i, j].numpy())
    sources.append(np.full(len(targets), (top + 1) * n))
    sinks.append(top * n + np.asarray(targets))
    capacities.append(np.full(len(targets), 1.0 / len(targets)))
    data = np.rint(np.concatenate(capacities) * resolution).astype(np.int32)
    kept = data > 0
    size = (top + 1) * n + 1
    return csr_array((data[kept], (np.concatenate(sources)[kept], np.concatenate(sinks)[kept])), shape=(size, size))


def attention_flow(layers: Sequence[LayerQK], targets: Sequence[int] | None = None, *, resolution: int = 10**6
                   ) -> torch.Tensor:
    """Attention flow (Abnar and Zuidema 2020) of the ``targets`` (default: the last position) to each input token.

    For at most :data:`FLOW_MAX_TOKENS` tokens. Capacities are the head-averaged attention with the residual,
    ``W_l = 0.5 * A_l + 0.5 * I``, as integers (``resolution`` per unit). Several targets share one source that
    feeds each with capacity ``1 / len(targets)`` (for one target: the paper's flow from that node). Returns
    ``[n]`` flow values in ``[0, 1]`` (they need not sum to 1); a token after the last target gets 0 (causal).
    """
    from scipy.sparse.csgraph import maximum_flow

    n = layers[0].key.shape[1]
    check_flow_length(n)
    r = target_row(n, targets)
    targets = torch.nonzero(r).flatten().tolist()
    everything = torch.arange(n)
    identity = torch.eye(n)
    matrices = [0.5 * head_mean_attention(layer.query, layer.key, layer.scale, everything, layer.window)[0]
                + 0.5 * identity for layer in layers]
    graph = flow_graph(matrices, targets, resolution)
    source = (len(layers) + 1) * n
    flows = torch.zeros(n, dtype=torch.float32)
    for token in range(max(targets) + 1):
        flows[token] = maximum_flow(graph, source, token).flow_value / resolution
    return flows


@dataclass
class _Capture:
    """The layers captured so far, and whether to keep them in 16 bits (:func:`compact`)."""

    half: bool
    layers: dict[int, LayerQK]


_ACTIVE: ContextVar[_Capture | None] = ContextVar("headwise_rollout_capture", default=None)


def mask_window(attention_mask: torch.Tensor | None, n: int, block: int) -> int | None:
    """The sliding window a layer's mask encodes (None: plain causal), checked block by block over the mask.

    ``sdpa_mask`` gives None when plain causal attention suffices, else a boolean or additive (very negative:
    masked) ``[batch, 1, n, n]`` mask. Any mask that is not causal with an optional window (padding, bidirectional
    spans) is refused: rollout recomputes attention from that rule.
    """
    if attention_mask is None:
        return None

    def allowed(start: int, stop: int) -> torch.Tensor:
        rows = attention_mask[0, 0, start:stop, :n]
        return rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2

    seen = int(allowed(n - 1, n).sum())
    window = None if seen == n else seen
    for start in range(0, n, block):
        stop = min(start + block, n)
        if not torch.equal(allowed(start, stop), visible(torch.arange(start, stop), 0, n, window)):
            raise HeadwiseError("attribution needs a causal attention mask, with or without a sliding window; this "
                                "model's mask is neither (padding or bidirectional spans)")
    return window


def compact(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in 16 bits: as it is if already 16-bit, else float16 (10-bit mantissa, finer than bfloat16's
    7) when every value fits float16's range, else float32."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.clone()
    half = t.to(torch.float16)
    return half if torch.isfinite(half).all() else t.float().clone()


def rollout_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, keeping the layer's queries, keys, scale and window for :func:`capture_qk`."""
    output, _ = sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    capture = _ACTIVE.get()
    if capture is None:
        return output, None
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise HeadwiseError("attribution captures one sequence in one forward pass with no cache")
    n, dim = key.shape[2], query.shape[-1]
    store = compact if capture.half else torch.clone
    capture.layers[module.layer_idx] = LayerQK(
        query=store(query[0]), key=store(key[0]), scale=scaling if scaling is not None else dim**-0.5,
        window=mask_window(attention_mask, n, default_block(1, n)),
    )
    return output, None


register(NAME, rollout_attention)


@contextmanager
def capturing(model: torch.nn.Module, *, half: bool = True) -> Iterator[dict[int, LayerQK]]:
    """Select the capture attention on ``model`` inside the block; yield the dict of layers that fills up.

    On exit, also after an exception, the model is left on headwise's own attention (``"headwise"``, which is SDPA
    for anything but a headwise cache): transformers has no public getter for the previous implementation.
    """
    with selected(model, NAME, _ACTIVE, _Capture(half=half, layers={})) as capture:
        yield capture.layers


@torch.inference_mode()
def capture_qk(model: torch.nn.Module, ids: Sequence[int], *, half: bool = True) -> list[LayerQK]:
    """Every layer's queries and keys for the token ``ids``, from one forward pass with no cache.

    With ``half`` (the default) they are kept in 16 bits (:func:`compact`), which halves the memory of float32
    models: ``2 * layers * (heads + kv_heads) * head_dim`` bytes per token (45 KiB for SmolLM2, 360 MiB at 8K).
    """
    input_ids = torch.tensor([list(ids)], dtype=torch.long)
    with capturing(model, half=half) as layers:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    expected = model.config.num_hidden_layers
    if sorted(layers) != list(range(expected)):
        raise HeadwiseError(f"captured attention from {len(layers)} of {expected} layers: this model does not run "
                            "every layer's attention through transformers' AttentionInterface")
    return [layers[i] for i in range(expected)]


@dataclass
class Attribution:
    """How much each token of a prompt contributed to an answer, by one method.

    ``relevance[i]`` belongs to ``tokens[i]``, the text of the prompt's token ``i``. ``targets`` are the positions
    whose rows were carried back: those whose outputs predicted the answer's tokens (the last prompt position and
    the answer's tokens but its last, fed teacher-forced), or the last prompt position without an answer.
    ``answer_share`` is the relevance that stayed on the answer's own tokens (not shown; 0 without an answer).
    """

    model: str
    method: str
    tokens: list[str]
    relevance: list[float]
    answer: str
    targets: list[int]
    answer_share: float
    seconds: float

    def top(self, k: int) -> list[int]:
        """Positions of the ``k`` most relevant prompt tokens, most relevant first."""
        order = sorted(range(len(self.relevance)), key=lambda i: -self.relevance[i])
        return order[:k]


def attribute(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int] | None = None,
    *,
    method: str = "rollout",
    half: bool = True,
    block: int | None = None,
) -> Attribution:
    """Attribute an answer (or, without one, the next token) to the prompt's tokens by rollout or flow.

    The answer is fed after the prompt, teacher-forced, and the targets are the positions that predicted its
    tokens: the last prompt position, then every answer token but the last (so a one-token answer and no answer
    have the same target). Their mean row is carried back (:func:`rollout`) or their flow taken
    (:func:`attention_flow`, at most :data:`FLOW_MAX_TOKENS` tokens fed). One forward pass captures the queries
    and keys (:func:`capture_qk`; ``half``: kept in 16 bits); ``block`` is rollout's query rows per block.
    """
    if method not in METHODS:
        raise HeadwiseError(f"unknown attribution method '{method}': use one of {', '.join(METHODS)}")
    prompt, answer = list(prompt_ids), list(answer_ids or [])
    if not prompt:
        raise HeadwiseError("the prompt is empty")
    ids = prompt + answer[:-1]
    if len(ids) > lm.info.context_length:
        raise HeadwiseError(f"the prompt and answer have {len(ids)} tokens but the model's context is "
                            f"{lm.info.context_length}")
    if method == "flow":
        check_flow_length(len(ids))
    start = time.perf_counter()
    layers = capture_qk(lm.model, ids, half=half)
    targets = list(range(len(prompt) - 1, len(ids)))
    relevance = rollout(layers, targets, block=block) if method == "rollout" else attention_flow(layers, targets)
    seconds = time.perf_counter() - start
    decode = lm.tokenizer.decode
    return Attribution(
        model=lm.name, method=method, tokens=[decode([t]) for t in prompt],
        relevance=relevance[: len(prompt)].tolist(), answer=decode(answer, skip_special_tokens=True),
        targets=targets, answer_share=float(relevance[len(prompt):].sum()), seconds=seconds,
    )
