"""Head views: per head, a joint 2-D map of its queries and keys, and the attention of chosen query tokens.

The map follows AttentionViz (Yeh et al. 2023, "AttentionViz: A Global View of Transformer Attention"): a head's
queries and keys are drawn in one space, after two changes that leave every softmax row unchanged (so the picture
shows the attention the head computes, not an artefact of how its projections happen to be scaled):

- the keys are translated by a constant vector (``q . (k + c) = q . k + q . c``: a constant per query row);
- the queries are scaled by ``s`` and the keys by ``1 / s`` (every product is unchanged).

They are chosen so that the keys' centroid equals the queries' centroid *and* both sets have the same mean norm
(:func:`balance_queries_keys`); the two components are then those of one PCA of the ``2n x d`` joint matrix.

Memory stays linear in the length ``n``: one forward pass runs with an attention function registered through
transformers' public ``AttentionInterface`` (:func:`headwise.attention.register`, which also registers the SDPA
mask function). It returns transformers' own SDPA output and, per layer, keeps only what the view needs: at most
``max_points`` projected tokens per head, and the attention rows of a few query positions (``n`` values each),
computed a block of query rows at a time from the post-RoPE queries and keys. No ``n x n`` matrix is ever built;
sliding-window layers get their window from the mask the function receives.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from headwise.attention import register, sdpa_attention, selected
from headwise.errors import HeadwiseError
from headwise.models import LoadedModel

VIEW_NAME = "headwise_headview"

#: Most attention scores (``heads x query rows x keys``) computed at once.
BLOCK_ELEMENTS = 4 * 2**20


@dataclass(frozen=True)
class Embedding:
    """One head's joint 2-D map: the chosen tokens' queries and keys, and the variance share of each component."""

    queries: torch.Tensor  # [points, 2]
    keys: torch.Tensor  # [points, 2]
    explained: torch.Tensor  # [2]


@dataclass
class HeadView:
    """What the head view shows for one input, for ``layers`` x ``num_heads`` query heads.

    ``rows[l, h, j]`` is the attention of query position ``query_positions[j]`` over all ``length`` keys in head
    ``h`` of layer ``layers[l]`` (zero where the head may not look: later tokens, outside a sliding window).
    ``queries_2d``/``keys_2d`` ``[layers, heads, points, 2]`` are the joint PCA coordinates of the tokens at
    ``point_positions``; ``explained`` ``[layers, heads, 2]`` is each component's share of the joint variance.
    """

    model: str
    tokens: list[str]
    layers: list[int]
    num_heads: int
    num_kv_heads: int
    query_positions: list[int]
    point_positions: list[int]
    queries_2d: torch.Tensor
    keys_2d: torch.Tensor
    explained: torch.Tensor
    rows: torch.Tensor
    seconds: float = 0.0

    @property
    def length(self) -> int:
        return len(self.tokens)

    def top_keys(self, k: int = 8) -> list[list[list[list[dict]]]]:
        """Per layer, head and query position, the ``k`` most attended keys: position, token, attention."""
        weights, where = self.rows.topk(min(k, self.length), dim=-1)
        return [[[[{"position": int(p), "token": self.tokens[int(p)], "attention": round(float(w), 6)}
                   for w, p in zip(weights[li, h, j], where[li, h, j], strict=True) if w > 0]
                  for j in range(len(self.query_positions))]
                 for h in range(self.num_heads)]
                for li in range(len(self.layers))]

    def summary(self, k: int = 8) -> dict:
        """The numbers behind the page as plain JSON-ready data (attention rows reduced to their top ``k`` keys)."""
        return {
            "model": self.model, "length": self.length, "layers": self.layers, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "query_positions": self.query_positions,
            "query_tokens": [self.tokens[p] for p in self.query_positions],
            "explained_variance": self.explained.round(decimals=4).tolist(),
            "long_range_mass": long_range_mass(self.rows, self.query_positions).round(decimals=4).tolist(),
            "top_keys": self.top_keys(k),
            "seconds": round(self.seconds, 3),
        }


def default_query_positions(length: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced query positions ending with the last token (the one that predicts the next)."""
    return sorted({(i + 1) * length // count - 1 for i in range(count)} - {-1})


def check_positions(positions: Sequence[int], length: int) -> list[int]:
    """Sorted distinct positions, negative ones counted from the end as in Python; out of range is an error."""
    out = set()
    for p in positions:
        if not -length <= p < length:
            raise HeadwiseError(f"query position {p} is out of range for a text of {length} tokens "
                                f"(use 0..{length - 1}, or -1 for the last)")
        out.add(p % length)
    if not out:
        raise HeadwiseError("no query position given")
    return sorted(out)


def point_positions(length: int, max_points: int, keep: Sequence[int] = ()) -> list[int]:
    """The token positions drawn on the map: ``keep``, plus others evenly spaced up to ``max_points`` in all (or
    every position of a shorter text). Deterministic, so a page shows the same tokens for every head."""
    if max_points < 1:
        raise HeadwiseError(f"max_points must be at least 1, got {max_points}")
    kept = set(keep)
    others = [p for p in range(length) if p not in kept]
    count = min(max(max_points - len(kept), 0), len(others))
    picked = torch.linspace(0, len(others) - 1, count).round().long().tolist() if count else []
    return sorted(kept | {others[i] for i in picked})


def _norm_balance(centered_keys: torch.Tensor, query_mean: torch.Tensor, query_norm: float) -> float:
    """The ``t > 0`` at which ``mean |centered_keys + t * query_mean| = t * query_norm`` (1.0 when none exists).

    ``f(t) = mean |K_c + t m| - t * query_norm`` is convex and strictly decreasing when ``|m| < query_norm``, with
    ``f(0) > 0``, so Newton's method from ``t = 0`` climbs to the single root without overshooting.
    """
    if query_norm - float(query_mean.norm()) <= 1e-9 * query_norm or float(centered_keys.abs().max()) == 0.0:
        return 1.0  # all queries equal, or all keys equal: no finite balance; keep the scale
    t = 0.0
    for _ in range(100):
        shifted = centered_keys + t * query_mean
        norms = shifted.norm(dim=1)
        value = float(norms.mean()) - t * query_norm
        if value <= 1e-12 * query_norm:
            break
        slope = float((shifted @ query_mean / norms.clamp(min=1e-300)).mean()) - query_norm
        t -= value / slope
    return t


def balance_queries_keys(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionViz's normalisation of one head's queries and keys ``[n, d]``, in float64.

    With ``m`` the queries' mean, ``K_c`` the centred keys and ``t = s**2`` from :func:`_norm_balance`, it returns
    ``s q`` and ``(K_c + t m) / s = K_c / s + s m``: a translation of the keys and the scaling by ``s`` and ``1 / s``.
    Afterwards the keys' centroid equals the queries' (``s m``) and both have the same mean norm; every softmax
    row of ``queries @ keys.T`` is unchanged (see the module docstring). The result depends only on the attention
    the pair computes up to those changes: ``(a q, k / a + c)`` gives the same output as ``(q, k)``.
    """
    q, k = queries.double(), keys.double()
    query_mean = q.mean(0)
    centered = k - k.mean(0)
    t = _norm_balance(centered, query_mean, float(q.norm(dim=1).mean()))
    return q * t**0.5, (centered + t * query_mean) / t**0.5


def joint_pca(queries: torch.Tensor, keys: torch.Tensor, positions: Sequence[int]) -> Embedding:
    """The queries and keys ``[n, d]`` of one head balanced (:func:`balance_queries_keys`), one PCA of all ``2n``
    vectors, and the 2-D coordinates of the tokens at ``positions``.

    The components are the top eigenvectors of the ``d x d`` covariance (exact and deterministic, linear in
    ``n``), each signed so that its largest loading is positive.
    """
    q, k = balance_queries_keys(queries, keys)
    centre = (q.sum(0) + k.sum(0)) / (2 * q.shape[0])
    q, k = q - centre, k - centre
    covariance = q.T @ q + k.T @ k
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    top = vectors[:, -2:].flip(1)
    largest = top[top.abs().argmax(0), torch.arange(2)]
    top = top * torch.where(largest < 0, -1.0, 1.0).to(top.dtype)
    total = float(values.clamp(min=0).sum())
    explained = values.flip(0)[:2].clamp(min=0) / total if total > 0 else torch.zeros(2, dtype=values.dtype)
    index = torch.as_tensor(list(positions), dtype=torch.long)
    return Embedding((q[index] @ top).float(), (k[index] @ top).float(), explained.float())


def long_range_mass(rows: torch.Tensor, positions: Sequence[int], window: int = 32) -> torch.Tensor:
    """Attention mass ``[..., queries]`` of rows ``[..., queries, n]`` on keys that are neither the first token
    (the usual attention sink) nor among the ``window`` most recent ones, the query included: the long-range part.
    """
    keys = torch.arange(rows.shape[-1])
    far = (keys >= 1) & (keys[None, :] <= torch.as_tensor(list(positions))[:, None] - window)
    return (rows * far).sum(-1)


def allowed_keys(attention_mask: torch.Tensor | None, positions: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean ``[queries, keys]``: the keys the query at each position may attend to, from the layer's mask.

    transformers' SDPA mask function gives None when a plain causal mask suffices, else a boolean mask or an
    additive float one (very negative where masked); sliding windows arrive that way.
    """
    if attention_mask is None:
        return torch.arange(length)[None, :] <= positions[:, None]
    rows = attention_mask[0, 0, positions, :length]
    if rows.dtype == torch.bool:
        return rows
    return rows > torch.finfo(rows.dtype).min / 2


def attention_rows(
    queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, positions: torch.Tensor, scale: float,
    *, block_elements: int = BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Softmax attention ``[heads, len(positions), n]`` of the queries at ``positions`` over all ``n`` keys.

    ``queries`` ``[heads, n, d]``, ``keys`` ``[kv_heads, n, d]``; query head ``h`` reads KV head
    ``h // (heads // kv_heads)`` (GQA). ``allowed`` ``[len(positions), n]`` marks the keys each row may see. Rows
    are computed in blocks of at most ``block_elements`` scores, so the cost is linear in ``n``.
    """
    heads, n, dim = queries.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    step = max(1, block_elements // (heads * n))
    keys_t = keys.float().transpose(1, 2)
    out = torch.empty(heads, len(positions), n)
    for start in range(0, len(positions), step):
        chosen = positions[start:start + step]
        q = queries[:, chosen].float().reshape(kv_heads, group * len(chosen), dim)
        scores = (q @ keys_t).reshape(heads, len(chosen), n) * scale
        mask = allowed[start:start + step]
        out[:, start:start + step] = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
    return out


@dataclass(frozen=True)
class LayerView:
    """One layer's part of a :class:`HeadView`."""

    queries_2d: torch.Tensor  # [heads, points, 2]
    keys_2d: torch.Tensor
    explained: torch.Tensor  # [heads, 2]
    rows: torch.Tensor  # [heads, queries, n]


def layer_view(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, scale: float,
    query_positions: Sequence[int], points: Sequence[int],
) -> LayerView:
    """The view of one layer from its attention inputs (``query`` ``[heads, n, d]``, ``key`` ``[kv_heads, n, d]``)."""
    heads, n = query.shape[:2]
    group = heads // key.shape[0]
    maps = [joint_pca(query[h], key[h // group], points) for h in range(heads)]
    where = torch.as_tensor(list(query_positions), dtype=torch.long)
    rows = attention_rows(query, key, allowed_keys(attention_mask, where, n), where, scale)
    return LayerView(torch.stack([m.queries for m in maps]), torch.stack([m.keys for m in maps]),
                      torch.stack([m.explained for m in maps]), rows)


@dataclass
class _Recorder:
    layers: set[int]
    query_positions: list[int]
    points: list[int]
    views: dict[int, LayerView] = field(default_factory=dict)


_ACTIVE: ContextVar[_Recorder | None] = ContextVar("headwise_headview_recorder", default=None)


def headview_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, plus the head view of this layer for the active recorder (batch 1, no cache)."""
    output, _ = sdpa_attention()(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    recorder = _ACTIVE.get()
    if recorder is None or module.layer_idx not in recorder.layers:
        return output, None
    if query.shape[0] != 1 or query.shape[2] != key.shape[2]:  # positions index both queries and keys
        raise HeadwiseError("the head view needs one sequence in one pass with no cache")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.no_grad():
        recorder.views[module.layer_idx] = layer_view(query[0], key[0], attention_mask, scale,
                                                      recorder.query_positions, recorder.points)
    return output, None


def _recording(model: torch.nn.Module, recorder: _Recorder) -> AbstractContextManager[_Recorder]:
    """Run ``model`` with the head-view attention inside the block (:func:`headwise.attention.selected`)."""
    register(VIEW_NAME, headview_attention)
    return selected(model, VIEW_NAME, _ACTIVE, recorder)


def head_view(
    lm: LoadedModel, ids: Sequence[int] | torch.Tensor, *, query_positions: Sequence[int] | None = None,
    max_points: int = 512, layers: Sequence[int] | None = None,
) -> HeadView:
    """The head view of ``lm`` on the token ids ``ids`` (one forward pass, memory linear in their number).

    ``query_positions`` default to :func:`default_query_positions` (negative ones count from the end);
    ``max_points`` bounds the tokens drawn per head (the query positions are always among them); ``layers``
    defaults to every layer.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel()
    info = lm.info
    if n == 0:
        raise HeadwiseError("the text has no tokens")
    if n > info.context_length:
        raise HeadwiseError(f"the text has {n} tokens but the model's context is {info.context_length}")
    chosen = list(range(info.num_layers)) if layers is None else sorted(set(layers))
    if not chosen or not all(0 <= layer < info.num_layers for layer in chosen):
        raise HeadwiseError(f"layers must be among 0..{info.num_layers - 1}, got {list(layers or [])}")
    positions = check_positions(default_query_positions(n) if query_positions is None else query_positions, n)
    recorder = _Recorder(set(chosen), positions, point_positions(n, max_points, positions))
    start = time.perf_counter()
    with torch.inference_mode(), _recording(lm.model, recorder):
        lm.model(input_ids=ids[None], use_cache=False, logits_to_keep=1)
    missing = [layer for layer in chosen if layer not in recorder.views]
    if missing:
        raise HeadwiseError(f"layers {missing} of {lm.name} never called the attention interface")
    views = [recorder.views[layer] for layer in chosen]
    return HeadView(
        model=lm.name, tokens=[lm.tokenizer.decode([t]) for t in ids.tolist()], layers=chosen,
        num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, query_positions=positions,
        point_positions=recorder.points, queries_2d=torch.stack([v.queries_2d for v in views]),
        keys_2d=torch.stack([v.keys_2d for v in views]), explained=torch.stack([v.explained for v in views]),
        rows=torch.stack([v.rows for v in views]), seconds=time.perf_counter() - start,
    )
