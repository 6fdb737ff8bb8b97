"""A KV cache that keeps a different set of tokens per KV head and frees the memory of the rest.

Layout
------
Each compressed layer stores, for every KV head ``h``, its own tensors ``keys[h]`` and ``values[h]`` of
shape ``[batch, n_h, head_dim]``, the original position of every kept token (``positions[h]``, int32) and
the policy's running score state. Heads of one layer may keep different counts (PyramidKV layer schedules,
AdaKV head allocation), and eviction allocates new, smaller tensors, so the bytes held follow the kept
count exactly: nothing is masked in a full-size tensor. Within a batch every row keeps the same count per
head (different tokens), so the tensors stay rectangular.

Keys are stored after RoPE, so a kept token keeps its original position; new tokens get their positions
from the logical length (:meth:`CompressedLayer.get_seq_length`), which counts every token ever seen.

Attention over the ragged heads runs in :func:`headwise.attention.headwise_attention`, the attention
function registered with transformers' ``AttentionInterface`` under the name ``"headwise"``. The layer's
``update`` hands itself to that function (a thread-local hand-off by layer index), which attends one
KV head at a time with its query group, feeds the policy the attention it needs, then lets the layer
compress. Compressing inside the forward, layer by layer, means the full cache of all layers never exists
at once, and with chunked prefill the peak stays near budget plus one chunk.

When compression happens
------------------------
* after every multi-token forward (prefill or a prefill chunk) until :meth:`HeadwiseCache.seal`;
* in ``mode="decode"`` also after every decoding step, keeping the layer at its budget (a token budget
  stays fixed; a ratio keeps that fraction of all tokens seen so far).

With a plan's ``act`` (:mod:`headwise.act`), the KV heads whose query group holds a calibrated head attend with
explicit weights, recalibrated where the prompt's attention found hidden sinks (:meth:`CompressedLayer.attend`);
the statistics are kept per position, so they survive eviction and chunked prefill.

Sliding-window layers (Gemma 3) keep the layer transformers' own ``DynamicCache`` builds for them (a
``DynamicSlidingWindowLayer``): they already hold at most one window, and headwise compresses only the
global-attention layers.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import Cache, CacheLayerMixin, DynamicCache

from headwise.act import SinkCalibration, hidden_sinks, recalibrate
from headwise.budgets import (
    ALLOCATIONS,
    adaptive_counts,
    check_prompt,
    check_schedule,
    chunk_scores,
    floor_tokens,
    keep_count,
    layer_budgets,
    layer_fractions,
)
from headwise.errors import HeadwiseError
from headwise.kernels import causal_attention, single_query_attention
from headwise.policies.base import Policy
from headwise.select.base import RuleState, Selector
from headwise.sparse.base import Pattern
from headwise.sparse.blocks import block_sparse_attention, computed_work
from headwise.sparse.plan import SparsePlan

MODES = ("prefill", "decode")
QUERY_BLOCK = 256  # queries per block when a policy needs the attention of many queries


@dataclass
class Plan:
    """What to keep, for every compressed layer of a model.

    Parameters
    ----------
    policy : Policy
        Scores tokens (see :mod:`headwise.policies`).
    ratio, budget : float or int
        Either the fraction of tokens removed, in [0, 1), or the tokens kept per KV head.
    mode : str
        ``"prefill"``: compress after each multi-token forward; ``"decode"``: also keep the budget while
        generating.
    schedule : str
        Per-layer budgets: ``"uniform"`` or ``"pyramid"`` (shrinking with depth, the mean kept exactly even
        where a layer's budget is clipped to what it can keep: :func:`headwise.budgets.layer_budgets`).
    slope : float
        Pyramid steepness: first layer ``1 + slope`` times the mean budget, last ``1 - slope``, before clipping.
    allocation : str
        Per-head budgets: ``"uniform"``, ``"adaptive"`` (AdaKV: one top-k over the scores of a layer's heads) or
        ``"global"`` (one top-k over every head of every layer, as KVzip allocates; the layers' budgets then
        only set the total). Global allocation needs every layer's scores at once: such a cache is built from
        a dense prefill (:func:`headwise.dense.compress`), not by a prefill.
    floor : float
        With adaptive or global allocation, the least each head keeps, as a fraction of its uniform share.
    group_reduce : str
        How the query heads of one GQA group are combined into one attention row per KV head:
        ``"mean"`` or ``"max"``.
    compensate : bool
        Keep, per head, one compensation token in place of everything it evicted: the mean of the evicted
        keys and values, which attention weighs as that many tokens (RazorAttention, Tang et al. 2024,
        "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads"). Costs one key and one
        value per head, counted in :meth:`CompressedLayer.nbytes`.
    chunk : int
        Keep whole runs of this many consecutive stored tokens: each run is ranked by its tokens' total score
        (ChunkKV, Liu et al. 2025; :func:`headwise.budgets.chunk_scores`), while the sinks and the recent window
        stay protected token by token. 1 (default): tokens are ranked one by one.
    select : Selector, optional
        A decode-time selection rule (:mod:`headwise.select`): each single-token forward reads, per KV head,
        only the stored tokens the rule picks (Quest's pages, say), from whatever the policy kept.
    sparse : Pattern or SparsePlan, optional
        A sparse prefill pattern, or a plan of one per head (:mod:`headwise.sparse`): each multi-token forward
        computes, per head, only the key blocks its pattern selects, while the head still holds every token
        (before any eviction). A policy that scores with attention computes the rows it observes densely (SnapKV's
        window over every key), whatever the pattern skipped.
    act : SinkCalibration, optional
        Attention-sink calibration (ACT, :mod:`headwise.act`) of the query heads a profile labels ``sink``: their
        attention to hidden sinks, found from the prompt's attention, is scaled down and given to the other keys
        (:meth:`CompressedLayer.attend`). It changes attention, not memory. It takes no ``sparse``, ``select`` or
        ``compensate``, and no plan that needs a dense prefill (:meth:`needs_dense_prefill`): each of them would
        attend by another path than the calibrated one.
    """

    policy: Policy
    ratio: float | None = None
    budget: int | None = None
    mode: str = "prefill"
    schedule: str = "uniform"
    slope: float = 0.5
    allocation: str = "uniform"
    floor: float = 0.2
    group_reduce: str = "mean"
    compensate: bool = False
    chunk: int = 1
    select: Selector | None = None
    sparse: Pattern | SparsePlan | None = None
    act: SinkCalibration | None = None

    def __post_init__(self) -> None:
        if self.policy.compresses and (self.ratio is None) == (self.budget is None):
            raise HeadwiseError(f"policy '{self.policy.name}' needs exactly one of a ratio or a budget")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise HeadwiseError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.budget is not None and self.budget < max(1, self.policy.min_budget()):
            raise HeadwiseError(
                f"budget {self.budget} is below the minimum of policy '{self.policy.name}' "
                f"({max(1, self.policy.min_budget())} tokens: sinks + window)"
            )
        checks = [("mode", self.mode, MODES), ("allocation", self.allocation, ALLOCATIONS),
                  ("group_reduce", self.group_reduce, ("mean", "max"))]
        for name, value, allowed in checks:
            if value not in allowed:
                raise HeadwiseError(f"unknown {name} '{value}'; use one of {', '.join(allowed)}")
        if not 0 <= self.floor <= 1:
            raise HeadwiseError(f"floor must be in [0, 1], got {self.floor}")
        if self.chunk < 1:
            raise HeadwiseError(f"chunk must be at least 1 token, got {self.chunk}")
        check_schedule(self.schedule, self.slope)
        if self.policy.scores_per_layer() and self.allocation != "uniform":
            raise HeadwiseError(f"policy '{self.policy.name}' keeps the same tokens in every head of a layer: "
                                "it takes no adaptive or global allocation")
        needs = self.policy.allocation()
        if needs == "own" and (self.schedule, self.allocation) != ("uniform", "uniform"):
            raise HeadwiseError(f"policy '{self.policy.name}' sets its own per-head budgets: "
                                "it takes no schedule or allocation option")
        if needs not in (None, "own") and self.allocation != needs:
            raise HeadwiseError(f"policy '{self.policy.name}' with these options needs allocation={needs}")
        if self.act is not None:
            self._check_act()

    def _check_act(self) -> None:
        """Refuse what would attend by another path than the calibrated one (see ``act`` in the class docstring)."""
        others = [name for name, given in (("sparse prefill", self.sparse), ("decode-time selection", self.select),
                                           ("compensate", self.compensate)) if given]
        if others:
            raise HeadwiseError(f"act (attention-sink calibration) takes no {' or '.join(others)}: drop one of them")
        if self.needs_dense_prefill():
            raise HeadwiseError(f"act (attention-sink calibration) cannot calibrate policy '{self.policy.name}' with "
                                f"allocation '{self.allocation}': its cache is built from a dense prefill, which "
                                "attends without calibration")

    def needs_dense_prefill(self) -> bool:
        """Whether a cache for this plan can only be built from a dense prefill (:func:`headwise.dense.compress`):
        its policy ranks by a reconstruction of the context, or its allocation compares every layer's scores."""
        return self.policy.reconstructs() or self.allocation == "global"

    def layer_target(self, seen: int, fractions: list[float], rank: int) -> int:
        """Tokens one KV head of layer ``rank`` keeps (on average) after ``seen`` tokens, where ``fractions``
        are the multipliers of the mean budget of every compressed layer (:func:`~headwise.budgets.layer_budgets`
        keeps their mean when a layer's budget is clipped to ``[min_budget, seen]``)."""
        if not self.policy.compresses:
            return seen
        base = keep_count(seen, ratio=self.ratio, budget=self.budget)
        return layer_budgets(base, fractions, min(seen, self.policy.min_budget()), seen)[rank]

    def describe(self) -> str:
        amount = f"ratio {self.ratio}" if self.ratio is not None else f"budget {self.budget}"
        reads = f", reads {self.select.name} {self.select.budget or self.select.fraction}" if self.select else ""
        reads += f", sparse prefill {self.sparse.describe()}" if self.sparse else ""
        reads += f", {self.act.describe()}" if self.act else ""
        if not self.policy.compresses:
            return self.policy.name + reads
        return f"{self.policy.name}, {amount}, {self.mode} mode, {self.schedule}/{self.allocation}{reads}"


class _Handoff(threading.local):
    """Per thread: the compressed layers whose ``update`` ran and whose attention has not yet, by layer index."""

    def __init__(self) -> None:
        self.pending: dict[int, CompressedLayer] = {}


HANDOFF = _Handoff()


def take_handoff(module: torch.nn.Module, key: torch.Tensor) -> CompressedLayer | None:
    """The compressed layer whose ``update`` ran for ``module``'s layer, if any (consumed once).

    The layer is found by the attention module's ``layer_idx`` (the index the model gave ``update``), not by
    the tensor ``update`` returned, so a model may cast, copy or reshape that tensor before attention. That
    tensor holds no tokens: keys with tokens come from another cache (a stale entry, left by an interrupted
    forward, is dropped), and no keys without a pending layer mean something other than ``update`` made them.
    """
    layer = HANDOFF.pending.pop(getattr(module, "layer_idx", None), None)
    if key.shape[-2] > 0:
        return None
    if layer is None:
        raise HeadwiseError(
            f"attention of {type(module).__name__} received no keys and no headwise cache layer: the model "
            "must call the cache's update() for the same layer index right before attention"
        )
    return layer


#: Tokens of room a head's tensors get when a decoding step outgrows them, so that decoding copies a head's
#: tokens once every this many steps rather than at every step. The room is counted in the bytes held.
DECODE_ROOM = 256


def grown(current: torch.Tensor, new: torch.Tensor, room: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                       torch.Tensor | None]:
    """``current`` [B, n, ...] with ``new`` [B, m, ...] appended along dim 1, and the buffer behind the result.

    A single new token (a decoding step) is written into the room of ``room``, the buffer ``current`` starts,
    when it has some; otherwise a buffer of ``DECODE_ROOM`` tokens more is allocated. Several new tokens (a
    prefill) allocate exactly what they need, so a prefilled cache holds its tokens' bytes and no more.
    """
    n, m = current.shape[1], new.shape[1]
    if room is not None and current.data_ptr() == room.data_ptr() and n + m <= room.shape[1]:
        room[:, n : n + m] = new
        return room[:, : n + m], room
    if m != 1:
        return torch.cat([current, new], dim=1), None
    room = current.new_empty((current.shape[0], n + m + DECODE_ROOM, *current.shape[2:]))
    room[:, :n], room[:, n : n + m] = current, new
    return room[:, : n + m], room


@dataclass
class _Head:
    """One KV head's kept tokens: keys/values [B, n, d], positions [B, n] (int32), the policy's state [B, n]
    (float32, in any precision of the model), and its policy.

    With compensation, ``summary`` holds the mean key and value of the evicted tokens ([B, 1, d] each) and
    ``evicted`` their count per row ([B], float); both stay None until the head first evicts. ``room`` holds,
    per tensor name, the buffer with room for decoding steps that the tensor starts (see :func:`grown`).
    """

    policy: Policy
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    state: torch.Tensor
    summary: tuple[torch.Tensor, torch.Tensor] | None = None
    evicted: torch.Tensor | None = None
    reads: Selector | None = None  # the decode-time selection rule this head follows (None: it reads all)
    selection: RuleState | None = None  # that rule's state for this head
    room: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        state = torch.zeros(positions.shape, dtype=torch.float32, device=keys.device)  # float32 in any precision
        new = {"keys": keys, "values": values, "positions": positions, "state": state}
        for name, tensor in new.items():
            value, self.room[name] = grown(getattr(self, name), tensor, self.room.get(name))
            setattr(self, name, value)

    def held(self, name: str) -> int:
        """Bytes held for the tensor ``name``: its buffer's when it has room, else its own."""
        tensor, room = getattr(self, name), self.room.get(name)
        return room.nbytes if room is not None and tensor.data_ptr() == room.data_ptr() else tensor.nbytes

    def keep(self, index: torch.Tensor, compensate: bool = False, valid: torch.Tensor | None = None) -> None:
        """Keep the tokens at ``index`` [B, k] (sorted), allocating new tensors so the rest is freed.

        With ``compensate``, the evicted tokens that are ``valid`` ([B, n] bool, None: all) are folded into
        the running mean ``summary`` first.
        """
        if compensate:
            self._summarize(index, valid)
        self.selection = None  # it described other tokens
        d = self.keys.shape[-1]
        wide = index.unsqueeze(-1).expand(-1, -1, d)
        self.keys = self.keys.gather(1, wide)
        self.values = self.values.gather(1, wide)
        self.positions = self.positions.gather(1, index)
        self.state = self.state.gather(1, index)

    def _summarize(self, index: torch.Tensor, valid: torch.Tensor | None) -> None:
        gone = torch.ones_like(self.positions, dtype=torch.bool).scatter(1, index, False)
        if valid is not None:
            gone &= valid
        weight = gone.to(self.keys.dtype)
        count = weight.sum(dim=1)
        sums = [torch.einsum("bn,bnd->bd", weight, x)[:, None] for x in (self.keys, self.values)]
        if self.summary is not None:
            sums = [s + m * self.evicted[:, None, None] for s, m in zip(sums, self.summary, strict=True)]
            count = count + self.evicted
        scale = count.clamp_min(1)[:, None, None]
        self.summary = (sums[0] / scale, sums[1] / scale)
        self.evicted = count

    def attended(
        self, allowed: torch.Tensor | None, q: int, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys [B, 1, m, d], values and SDPA mask for attention, over the tokens at ``index`` [B, k] only when
        given (decode-time selection); the summary (if any) weighs ``evicted`` tokens."""
        keys, values = self.keys, self.values
        if index is not None:
            wide = index[..., None].expand(-1, -1, keys.shape[-1])
            keys, values = keys.gather(1, wide), values.gather(1, wide)
            if allowed is not None:
                allowed = allowed.gather(-1, index[:, None, None, :].expand(-1, 1, allowed.shape[2], -1))
        keys, values = keys[:, None], values[:, None]
        if self.summary is None:
            return keys, values, allowed
        b, n = keys.shape[0], keys.shape[2]
        mask = keys.new_zeros(b, 1, q, n)
        if allowed is not None:
            mask = mask.masked_fill(~allowed, float("-inf"))
        bias = self.evicted.log()[:, None, None, None].expand(b, 1, q, 1).to(mask.dtype)
        keys = torch.cat([self.summary[0][:, None], keys], dim=2)
        values = torch.cat([self.summary[1][:, None], values], dim=2)
        return keys, values, torch.cat([bias, mask], dim=-1)

    def nbytes(self) -> int:
        """Bytes of the kept keys and values (their room for decoding included), and of the summary token."""
        return self.held("keys") + self.held("values") + sum(t.nbytes for t in self.summary or ())

    def select_batch(self, index: torch.Tensor) -> None:
        self.keys, self.values = self.keys[index], self.values[index]
        self.positions, self.state = self.positions[index], self.state[index]
        self.selection = None
        if self.summary is not None:
            self.summary = (self.summary[0][index], self.summary[1][index])
            self.evicted = self.evicted[index]


def _probabilities(query: torch.Tensor, keys_t: torch.Tensor, allowed: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """Attention weights (float32) of ``query`` [B, G, r, d] over transposed keys ``keys_t`` [B, 1, d, n] (float32),
    with the bool mask ``allowed`` (None: every key); a row that may see no key is all zeros."""
    logits = torch.matmul(query.float(), keys_t) * scaling
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(dim=-1).nan_to_num(0.0)


class CompressedLayer(CacheLayerMixin):
    """One global-attention layer of a :class:`HeadwiseCache` (see the module docstring)."""

    is_sliding = False
    is_compileable = False

    def __init__(
        self, plan: Plan, fraction: float = 1.0, layer_idx: int = 0, schedule: dict[int, float] | None = None
    ) -> None:
        """``schedule`` maps every compressed layer of the cache (by layer index, this one included) to its
        multiplier of the mean budget, so that their budgets keep the mean together; without one the layer
        stands alone with multiplier ``fraction``."""
        super().__init__()
        self.plan = plan
        self.schedule = dict(schedule) if schedule is not None else {layer_idx: fraction}
        self.fraction = self.schedule[layer_idx]
        self.layer_idx = layer_idx
        self.heads: list[_Head] = []
        self.seen = 0
        self.sealed = False
        self.prompt_checked = False
        self.read_tokens = 0.0  # decode-time reads, summed over steps and heads (with what the heads held)
        self.held_tokens = 0
        self.pairs_computed: dict[int, int] = {}  # prefill with a sparse plan: causal (query, key) pairs per KV
        self.pairs_causal: dict[int, int] = {}  # head (its query group), computed and all
        self.shared: dict[str, torch.Tensor] = {}  # decoding room all heads share (see _share_room)
        # global allocation: (scores per head, layer budget, valid) until HeadwiseCache.allocate compresses
        self.pending: tuple[list[torch.Tensor], int, list[torch.Tensor | None]] | None = None
        # act (see attend): the query heads it calibrates here, and per calibrated head and position, the attention
        # received and the rows that could see it ([B, len(calibrated), positions] float32 each), and the sinks found
        self.calibrated = plan.act.heads(layer_idx) if plan.act is not None else []
        self.sink_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sinks: torch.Tensor | None = None

    # transformers cache-layer API -------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        empty = key_states.new_zeros(b, 0, d)
        positions = torch.zeros(b, 0, dtype=torch.int32, device=self.device)
        rule = self.plan.select
        self.heads = [
            _Head(self.plan.policy.for_head(self.layer_idx, i), empty, empty, positions, positions.to(torch.float32),
                  reads=rule.for_head(self.layer_idx, i) if rule is not None else None)
            for i in range(h)
        ]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens of every head and hand this layer to the headwise attention function."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if any(i < self.layer_idx for i in HANDOFF.pending):  # an earlier layer of this forward skipped it
            raise HeadwiseError(
                "a headwise cache needs the 'headwise' attention implementation: build it with "
                "headwise.api.make_cache(model, ...) or call model.set_attn_implementation('headwise')"
            )
        HANDOFF.pending.clear()  # left by an interrupted forward
        self._store(key_states, value_states)
        HANDOFF.pending[self.layer_idx] = self
        b, h, _, d = key_states.shape
        nothing = key_states.new_empty(b, h, 0, d)
        return nothing, nothing

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append new tokens [B, H, q, d] to every head, at the positions after the ``seen`` ones."""
        b, _, q, _ = key_states.shape
        if not self.prompt_checked:  # the first forward holds the whole prompt, unless check_prompt came first
            check_prompt(self.plan, q)
            self.prompt_checked = True
        positions = torch.arange(self.seen, self.seen + q, dtype=torch.int32, device=self.device).expand(b, q)
        if q == 1:
            self._share_room()
        if q == 1 and self._stacked() is not None:
            self._append_stacked(key_states, value_states, positions)
        else:
            for h, head in enumerate(self.heads):
                head.append(key_states[:, h], value_states[:, h], positions)
        self.seen += q

    def _append_stacked(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor) -> None:
        """A decoding step's token [B, H, 1, d] written for all heads at once into the shared buffers, which
        :meth:`_share_room` has just made sure have room for it; each head's tensors then view one more token.
        The policy state of the new token is zero, as in :meth:`_Head.append`."""
        n = self.heads[0].keys.shape[1]
        new = {"keys": key_states[:, :, 0], "values": value_states[:, :, 0], "positions": positions, "state": 0.0}
        for name, value in new.items():
            self.shared[name][:, :, n] = value
        for head in self.heads:
            for name in new:
                setattr(head, name, head.room[name][:, : n + 1])

    def _share_room(self) -> None:
        """Before a decoding step that outgrows the heads' room, when every head holds as many tokens and no
        summary: move them into buffers that all heads share (one per tensor, [B, H, room, ...]), each head's
        tensors and room being views of its slice. Decoding steps then attend over all heads in one product
        (:meth:`_stacked`), not head by head. The bytes held stay the same as with a room per head."""
        self._release_shared()
        n = self.heads[0].keys.shape[1]
        if any(h.keys.shape[1] != n or h.summary is not None for h in self.heads):
            return
        room = self.heads[0].room.get("keys")
        if room is not None and self.heads[0].keys.data_ptr() == room.data_ptr() and n < room.shape[1]:
            return  # the heads still have room (each, or shared)
        for name in ("keys", "values", "positions", "state"):
            first = getattr(self.heads[0], name)
            buffer = first.new_zeros((first.shape[0], len(self.heads), n + 1 + DECODE_ROOM, *first.shape[2:]))
            for i, head in enumerate(self.heads):
                buffer[:, i, :n] = getattr(head, name)
                head.room[name] = buffer[:, i].detach()  # its storage, but no autograd view: a step with grad
                setattr(head, name, head.room[name][:, :n])  # enabled may write into room made without
            self.shared[name] = buffer

    def _release_shared(self) -> None:
        """Drop the shared buffers once the heads hold their tokens elsewhere (after an eviction), so that
        they are freed."""
        if self.shared and self._stacked() is None:
            self.shared = {}

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The shared buffers of keys and values [B, H, room, d] and the count ``n`` of tokens every head holds
        in them, when all heads still hold their tokens there (same count, nothing evicted since); None
        otherwise. The room past ``n`` holds zeros."""
        keys, values = self.shared.get("keys"), self.shared.get("values")
        if keys is None or values is None:
            return None
        n = self.heads[0].keys.shape[1]
        step_k, step_v = keys.stride(1) * keys.element_size(), values.stride(1) * values.element_size()
        for i, head in enumerate(self.heads):  # where head i's slice starts, without making a view of it
            if (head.keys.shape[1] != n or head.keys.data_ptr() != keys.data_ptr() + i * step_k
                    or head.values.data_ptr() != values.data_ptr() + i * step_v):
                return None
        return keys, values, n

    def absorb(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        reconstruction: torch.Tensor | None = None,
    ) -> None:
        """Take one forward's keys and values [B, H, q, d] as :meth:`update` would, then let ``query``
        [B, Hq, q, d] (with the forward's ``attention_mask``) feed the policy and compress, as :meth:`attend`
        would, without computing the attention output.

        This builds a compressed layer from dense tensors captured once (:mod:`headwise.dense`): for a
        single-forward prefill the kept tokens depend only on these tensors, so one dense forward can feed
        every policy and ratio. ``reconstruction`` [B, H, q] is what a policy that
        :meth:`~headwise.policies.base.Policy.reconstructs` folds instead (:func:`headwise.dense.reconstruct`).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._store(key_states, value_states)
        self._feed_policy(query, attention_mask, scaling, reconstruction)

    def get_seq_length(self) -> int:
        """Logical length: every token seen, kept or not (positions of new tokens follow it)."""
        return self.seen

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        """Masks are built over logical positions; :meth:`attend` picks the columns of the kept tokens.

        transformers passes the query length (5.24 on) or a tensor of the query's positions (before), whose
        length is all that is read.
        """
        query_length = query if isinstance(query, int) else len(query)
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        """No maximum (transformers 5.24 on)."""
        return -1

    def get_max_cache_shape(self) -> int:
        """No maximum (the same, under its name before transformers 5.24)."""
        return -1

    def reset(self) -> None:
        self.heads = []
        self.shared = {}
        self.sink_stats, self.sinks = None, None
        self.seen = 0
        self.is_initialized = False
        self.prompt_checked = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        index = beam_idx.to(self.device)
        for head in self.heads:
            head.select_batch(index)
        self._release_shared()
        if self.sink_stats is not None and self.sinks is not None:
            self.sink_stats = (self.sink_stats[0][index], self.sink_stats[1][index])
            self.sinks = self.sinks[index]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.heads:
            index = torch.arange(self.heads[0].keys.shape[0], device=self.device).repeat_interleave(repeats)
            self.reorder_cache(index)

    # memory accounting ------------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes held by the kept keys and values of all heads (and their compensation tokens)."""
        return sum(h.nbytes() for h in self.heads)

    def metadata_bytes(self) -> int:
        """Bytes of bookkeeping: original positions and policy state of the kept tokens, eviction counts, and act's
        statistics and sinks per position."""
        act = 0 if self.sinks is None else self.sinks.nbytes + sum(t.nbytes for t in self.sink_stats or ())
        return act + sum(h.held("positions") + h.held("state") + (h.evicted.nbytes if h.evicted is not None else 0)
                         + (h.selection.nbytes() if h.selection is not None else 0) for h in self.heads)

    def kept(self) -> list[int]:
        """Tokens kept per KV head (not counting a compensation token)."""
        return [h.keys.shape[1] for h in self.heads]

    # attention and compression ----------------------------------------------------------------------------

    def _allowed(
        self, head: _Head, attention_mask: torch.Tensor | None, q: int, rows: slice = slice(None)
    ) -> torch.Tensor | None:
        """Boolean mask [B, 1, r, n] of the kept keys that new queries ``rows`` may see (None: all of them).

        ``attention_mask`` is over logical positions (see :meth:`get_mask_sizes`); its columns are picked at
        the kept tokens' positions. Without one, causality is decided by position.
        """
        query_pos = torch.arange(self.seen - q, self.seen, device=self.device)[rows]
        if attention_mask is None:
            if query_pos[0] >= self.seen - 1:
                return None
            return (head.positions[:, None, None, :] <= query_pos[None, None, :, None]).expand(-1, 1, -1, -1)
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0
        b, n = head.positions.shape
        mask = attention_mask[:, :, -q:, :][:, :, rows].expand(b, 1, len(query_pos), attention_mask.shape[-1])
        return mask.gather(-1, head.positions.long()[:, None, None, :].expand(b, 1, len(query_pos), n))

    def _compressing(self, q: int) -> bool:
        return self.plan.policy.compresses and not self.sealed and (q > 1 or self.plan.mode == "decode")

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of ``query`` [B, Hq, q, d] over the kept tokens, head group by head group.

        Returns the output as [B, q, Hq, d], the layout transformers' attention functions return.

        With the plan's ``act``, the KV heads whose query group holds a calibrated head attend by
        :meth:`_calibrated_attention` (explicit weights, the calibrated rows recalibrated); every other head takes
        the paths it takes without ``act``.
        """
        _, hq, q, _ = query.shape
        group = hq // len(self.heads)
        calibrating = self.calibrating(group)
        counting = bool(calibrating) and q > 1 and not self.sealed  # a prompt's forward: its rows count for act
        if counting:
            self._grow_sink_stats(query.shape[0])
        one_product = (q == 1 and attention_mask is None and self.plan.select is None and not torch.is_grad_enabled()
                       and not calibrating)
        stacked = self._stacked() if one_product else None  # (the shared buffers record no gradient)
        if stacked is not None:  # a decoding step over every head's tokens: one product for all heads, over the
            keys, values, n = stacked  # whole buffers (contiguous: a slice of them would be copied by the product)
            held = torch.arange(keys.shape[2], device=self.device) < n  # and the zeros of the room masked out
            output = single_query_attention(query, keys, values, held, scaling)
            self._feed_policy(query, attention_mask, scaling)
            return output.transpose(1, 2)
        outputs = []
        sparse = self.plan.sparse is not None and q > 1 and self._only_causal(attention_mask, q)
        for h, head in enumerate(self.heads):
            q_h = query[:, h * group : (h + 1) * group]
            whole = head.summary is None and head.keys.shape[1] == self.seen  # every token seen, at its position
            if h in calibrating:
                outputs.append(self._calibrated_attention(h, q_h, attention_mask, scaling, calibrating[h],
                                                          counting and whole))
                continue
            pattern = self.plan.sparse.for_head(self.layer_idx, h) if sparse else None
            if pattern is not None and whole:
                outputs.append(self._sparse_attention(h, pattern, q_h, scaling))
                continue
            if sparse:  # computed densely: all its causal pairs count as computed
                work = (q * (self.seen - q) + q * (q + 1) // 2) * group
                self._count(h, work, work)
            if q > 1 and whole and attention_mask is None:  # no padding, nothing evicted: the plain causal mask
                outputs.append(causal_attention(q_h, head.keys[:, None], head.values[:, None], scaling))
                continue
            allowed = self._allowed(head, attention_mask, q)
            index = self._select(head, q_h) if q == 1 and self.plan.select is not None else None
            keys, values, mask = head.attended(allowed, q, index)
            if q == 1:  # a decoding step: two products beat the fused kernel's one query block
                outputs.append(single_query_attention(q_h, keys, values, mask, scaling))
                continue
            outputs.append(F.scaled_dot_product_attention(q_h, keys, values, attn_mask=mask, scale=scaling,
                                                          enable_gqa=True))
        self._feed_policy(query, attention_mask, scaling)
        return torch.cat(outputs, dim=1).transpose(1, 2)

    def attention_weights(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per KV head, the attention probabilities [B, G, q, m] (float32) of its query group over the tokens it
        holds, and those tokens' positions [B, m]: the weights :meth:`attend` uses, for callers that read
        attention (:mod:`headwise.explain.lookback`). A compensation summary comes first, at position -1. Call
        it before :meth:`attend`, which may evict. Decode-time selection reads other tokens, and act (sink
        calibration) changes the weights: both are refused."""
        if self.plan.select is not None:
            raise HeadwiseError("attention weights are read over every held token: drop the decode-time selection")
        if self.plan.act is not None:
            raise HeadwiseError("attention weights are read without calibration: drop act (attention-sink calibration)")
        group = query.shape[1] // len(self.heads)
        weights = []
        for h, head in enumerate(self.heads):
            keys, _, mask = head.attended(self._allowed(head, attention_mask, query.shape[2]), query.shape[2])
            logits = torch.matmul(query[:, h * group : (h + 1) * group].float(), keys.float().transpose(-1, -2))
            logits = logits * scaling
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
            positions = head.positions
            if head.summary is not None:
                positions = torch.cat([positions.new_full((positions.shape[0], 1), -1), positions], dim=1)
            weights.append((logits.softmax(dim=-1), positions))
        return weights

    # act: attention-sink calibration ----------------------------------------------------------------------

    def calibrating(self, group: int) -> dict[int, list[tuple[int, int]]]:
        """The KV heads whose query group (``group`` query heads each) holds a calibrated head, each with its
        calibrated heads as (index in the group, index in the statistics)."""
        members: dict[int, list[tuple[int, int]]] = {}
        for c, query_head in enumerate(self.calibrated):
            members.setdefault(query_head // group, []).append((query_head % group, c))
        return members

    def _grow_sink_stats(self, batch: int) -> None:
        """Make act's statistics and sinks cover every position seen (zeros and no sink for the new ones)."""
        if self.sink_stats is None or self.sinks is None:
            empty = torch.zeros(batch, len(self.calibrated), 0, dtype=torch.float32, device=self.device)
            self.sink_stats, self.sinks = (empty, empty.clone()), empty.bool()
        more = self.seen - self.sinks.shape[-1]
        if more > 0:
            self.sink_stats = tuple(F.pad(t, (0, more)) for t in self.sink_stats)
            self.sinks = F.pad(self.sinks, (0, more))

    def held_sinks(self, head: _Head, stats: list[int]) -> torch.Tensor | None:
        """Which tokens ``head`` holds are sinks for the calibrated heads ``stats`` (indices in the statistics):
        [B, len(stats), n] bool, gathered at the tokens' positions; a position with no statistics is no sink. None
        when there are no sinks at all."""
        if self.sinks is None or not self.sinks[:, stats].any():
            return None
        positions = head.positions.long()
        last = self.sinks.shape[-1] - 1
        index = positions.clamp(max=last)[:, None].expand(-1, len(stats), -1)
        return self.sinks[:, stats].gather(-1, index) & (positions <= last)[:, None]

    def _calibrated_attention(self, h: int, q_h: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                              members: list[tuple[int, int]], count: bool) -> torch.Tensor:
        """Attention [B, G, q, d] of KV head ``h``'s query group ``q_h`` [B, G, q, d] with ACT on its ``members``
        (:meth:`calibrating`), a block of queries at a time (never the whole [q, n] matrix), weights in float32.

        With ``count`` (a prompt's multi-token forward while the head holds every token it has seen, so a column
        is a position) it takes two passes: the first adds the members' weights to the attention received per
        position and the rows that could see it to the viewers, then finds the sinks
        (:func:`headwise.act.hidden_sinks`); the second recomputes the weights and recalibrates the members' rows.
        Otherwise (decoding steps, a question after the context was sealed, forwards after eviction) one pass
        recalibrates with the sinks found so far, at the positions the head holds. In a chunked prefill each chunk's
        rows are thus calibrated with the sinks found up to it, its own rows included. The policy observes the
        uncalibrated attention it would observe without act (:meth:`_feed_policy`).
        """
        assert self.plan.act is not None
        head = self.heads[h]
        local, stats = [g for g, _ in members], [c for _, c in members]
        q = q_h.shape[2]
        keys, values = head.keys[:, None].float().transpose(-1, -2), head.values[:, None]
        blocks = [slice(start, min(q, start + QUERY_BLOCK)) for start in range(0, q, QUERY_BLOCK)]
        if count:
            self._count_sinks(head, q_h[:, local], keys, attention_mask, scaling, stats, blocks)
        sinks = self.held_sinks(head, stats)
        output = q_h.new_empty(q_h.shape)
        for rows in blocks:
            probs = _probabilities(q_h[:, :, rows], keys, self._allowed(head, attention_mask, q, rows), scaling)
            if sinks is not None:
                probs[:, local] = recalibrate(probs[:, local], sinks[:, :, None, :], self.plan.act.beta)
            output[:, :, rows] = torch.matmul(probs.to(values.dtype), values)
        return output

    @torch.no_grad()  # statistics that outlive the forward, not a function to differentiate
    def _count_sinks(self, head: _Head, q_c: torch.Tensor, keys_t: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float, stats: list[int], blocks: list[slice]) -> None:
        """Pass 1 of :meth:`_calibrated_attention`: add the weights of the calibrated queries ``q_c`` [B, C, q, d]
        over ``head``'s keys (transposed, float32: ``keys_t`` [B, 1, d, n]) to their statistics ``stats``, block by
        block of query rows, then find their sinks. The head holds every token it has seen: column j is position j."""
        assert self.plan.act is not None and self.sink_stats is not None and self.sinks is not None
        received, viewers = self.sink_stats
        q, n = q_c.shape[2], keys_t.shape[-1]
        for rows in blocks:
            allowed = self._allowed(head, attention_mask, q, rows)
            received[:, stats, :n] += _probabilities(q_c[:, :, rows], keys_t, allowed, scaling).sum(dim=2)
            viewers[:, stats, :n] += allowed.sum(dim=2).float() if allowed is not None else rows.stop - rows.start
        self.sinks[:, stats] = hidden_sinks(received[:, stats], viewers[:, stats], self.plan.act.threshold)

    def _only_causal(self, attention_mask: torch.Tensor | None, q: int) -> bool:
        """Whether the mask of this forward's ``q`` queries is plain causal over the ``seen`` tokens (no padding),
        which block-sparse prefill takes for granted. A head computes block-sparse only then, and only while it
        still holds every token it has seen (so block positions are positions)."""
        if attention_mask is None:
            return True
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        if allowed.shape[-1] != self.seen:
            return False
        causal = torch.arange(self.seen)[None, :] <= torch.arange(self.seen - q, self.seen)[:, None]
        return bool((allowed[..., -q:, :] == causal.to(allowed.device)).all())

    def _sparse_attention(self, h: int, pattern: Pattern, q_h: torch.Tensor, scaling: float) -> torch.Tensor:
        """Block-sparse attention of KV head ``h``'s query group ``q_h`` [B, G, q, d] over its tokens, counted."""
        head = self.heads[h]
        keys, values = head.keys[:, None], head.values[:, None]
        offset = self.seen - q_h.shape[2]
        layout = pattern.layout(q_h, keys, offset)
        computed, causal = computed_work(layout, q_h.shape[2], self.seen, pattern.block, offset)
        self._count(h, computed // layout.shape[0], causal // layout.shape[0])
        return block_sparse_attention(q_h, keys, values, layout, pattern.block, scaling, offset)

    def _count(self, h: int, computed: int, causal: int) -> None:
        self.pairs_computed[h] = self.pairs_computed.get(h, 0) + computed
        self.pairs_causal[h] = self.pairs_causal.get(h, 0) + causal

    def _select(self, head: _Head, q_h: torch.Tensor) -> torch.Tensor | None:
        """The stored tokens of ``head`` that this decoding step reads (None: all), counted for accounting with
        what choosing them read."""
        n = head.keys.shape[1]
        if head.reads is None:  # a head the plan keeps dense
            self.held_tokens += n
            self.read_tokens += n
            return None
        with torch.no_grad():  # a choice, not a function to differentiate; its state outlives the step
            choice = head.reads.choose(q_h[:, :, 0], head.keys, head.selection)
        head.selection = choice.state
        self.held_tokens += n
        self.read_tokens += (n if choice.index is None else choice.index.shape[1]) + choice.overhead
        return choice.index

    def _feed_policy(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                     reconstruction: torch.Tensor | None = None) -> None:
        """After a forward's attention: give each head's policy the attention rows it needs (a reconstructing
        policy gets its row of ``reconstruction`` [B, H, n]), then compress (only while compressing: see
        :meth:`_compressing`). The rows are computed here afresh, so with the plan's ``act`` a policy observes the
        uncalibrated attention, as it would without calibration."""
        _, hq, q, _ = query.shape
        if not self._compressing(q):
            return
        group = hq // len(self.heads)
        valid = []
        for h, head in enumerate(self.heads):
            needed = head.policy.queries_needed()
            if head.policy.reconstructs():
                if reconstruction is None:
                    raise HeadwiseError(f"policy '{head.policy.name}' ranks tokens by a reconstruction of the "
                                        "context: build its cache with headwise.dense (reconstruct, compress)")
                head.state = head.policy.accumulate(head.state[:, None], reconstruction[:, h, None, None])[:, 0]
            elif needed != 0:
                self._observe(head, query[:, h * group : (h + 1) * group], attention_mask, scaling, needed)
            last = self._allowed(head, attention_mask, q, slice(q - 1, q))
            valid.append(last[:, 0, -1, :] if last is not None else None)
        self._compress(valid)

    def _observe(
        self, head: _Head, q_h: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float, needed: int | None
    ) -> None:
        """Feed the policy the attention rows of the queries it needs, a block of queries at a time."""
        q = q_h.shape[2]
        first = 0 if needed is None else max(0, q - needed)
        keys = head.keys[:, None].float().transpose(-1, -2)  # scores in float32 whatever the model's precision
        for start in range(first, q, QUERY_BLOCK):
            stop = min(q, start + QUERY_BLOCK)
            logits = torch.matmul(q_h[:, :, start:stop].float(), keys) * scaling
            allowed = self._allowed(head, attention_mask, q, slice(start, stop))
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            probs = logits.softmax(dim=-1).nan_to_num(0.0)
            probs = probs.mean(dim=1) if self.plan.group_reduce == "mean" else probs.amax(dim=1)
            head.state = head.policy.accumulate(head.state[:, None], probs[:, None])[:, 0]

    def policy_scores(self) -> list[torch.Tensor]:
        """Each KV head's policy scores [B, n] (float), averaged over the heads where the plan's policy makes
        one choice per layer (:meth:`~headwise.policies.base.Policy.scores_per_layer`), and pooled over runs of the
        plan's ``chunk`` tokens."""
        scores = []
        for head in self.heads:
            tensors = (head.keys, head.values, head.state, head.positions)
            scores.append(head.policy.score(*(t[:, None] for t in tensors))[:, 0].float())
        if self.plan.policy.scores_per_layer():
            shared = torch.stack(scores).mean(dim=0)  # the heads hold the same tokens (one choice per layer)
            scores = [shared] * len(scores)
        return [chunk_scores(s, self.plan.chunk) for s in scores]

    def scores(self, head: _Head, score: torch.Tensor, valid: torch.Tensor | None, budget: int) -> torch.Tensor:
        """``head``'s policy scores ``score`` [B, n] with protected tokens at +inf and padding at -inf."""
        policy = head.policy
        s = score.clone()
        n = s.shape[1]
        is_valid = valid if valid is not None else torch.ones_like(s, dtype=torch.bool)
        rank = is_valid.long().cumsum(dim=1) - 1
        protect = is_valid & (rank < policy.sinks)
        recent = min(policy.recent(budget), n)
        if recent:
            protect[:, n - recent :] = True
        s[protect] = float("inf")
        s[~is_valid] = float("-inf")
        return s

    def _compress(self, valid: list[torch.Tensor | None]) -> None:
        order = sorted(self.schedule)
        budget = self.plan.layer_target(self.seen, [self.schedule[i] for i in order], order.index(self.layer_idx))
        by_role = self.plan.policy.head_budgets(self.layer_idx, self.seen, budget)
        if by_role is not None:
            counts = [min(c, n) for c, n in zip(by_role, self.kept(), strict=True)]
            if counts == self.kept():
                return
            scores = [self.scores(head, s, v, c)
                      for head, s, v, c in zip(self.heads, self.policy_scores(), valid, counts, strict=True)]
        elif all(n <= budget for n in self.kept()):
            return
        else:
            scores = [self.scores(head, s, v, budget)
                      for head, s, v in zip(self.heads, self.policy_scores(), valid, strict=True)]
            if self.plan.allocation == "global":  # decided over every layer at once: HeadwiseCache.allocate
                self.pending = (scores, budget, valid)
                return
            if self.plan.allocation == "adaptive":
                floor = floor_tokens(budget, self.plan.floor)
                counts = adaptive_counts([s.mean(dim=0) for s in scores], budget * len(self.heads), floor)
            else:
                counts = [min(budget, s.shape[1]) for s in scores]
        self.keep_top(scores, counts, valid)

    def keep_top(self, scores: list[torch.Tensor], counts: list[int], valid: list[torch.Tensor | None]) -> None:
        """Each head keeps its ``counts`` highest ``scores`` [B, n] (``valid``: its non-padding tokens)."""
        for head, s, k, v in zip(self.heads, scores, counts, valid, strict=True):
            if k < s.shape[1]:
                head.keep(torch.topk(s, k, dim=1).indices.sort(dim=1).values, self.plan.compensate, v)
        self._release_shared()


class HeadwiseCache(Cache):
    """A transformers ``Cache`` whose global-attention layers are :class:`CompressedLayer`.

    Build it with :func:`headwise.api.make_cache`, which also selects the ``"headwise"`` attention.
    """

    def __init__(self, config, plan: Plan) -> None:
        text = config.get_text_config()
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise HeadwiseError(f"layer types {unknown} are not supported by the headwise cache")
        plan.policy.bind(config)  # every part checked against the model before a layer reads it
        for part in (plan.select, plan.sparse, plan.act):
            if part is not None:
                part.bind(config)
        full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
        fractions = dict(zip(full, layer_fractions(len(full), plan.schedule, plan.slope), strict=True))
        dense = DynamicCache(config=config).layers  # transformers' own layer for each sliding layer
        layers: list[CacheLayerMixin] = [
            CompressedLayer(plan, layer_idx=i, schedule=fractions) if i in fractions else dense[i]
            for i in range(len(layer_types))
        ]
        super().__init__(layers=layers)
        self.model_config = config
        self.plan = plan

    @property
    def compressed_layers(self) -> list[CompressedLayer]:
        return [layer for layer in self.layers if isinstance(layer, CompressedLayer)]

    def check_prompt(self, prompt_length: int) -> None:
        """Refuse a prompt of ``prompt_length`` tokens that the plan cannot compress as asked
        (:func:`headwise.budgets.check_prompt`).

        Call it with the whole prompt's length before prefilling it in chunks (:func:`headwise.generation.prefill`
        does); otherwise the first forward (``model.generate``'s prefill) is checked as the whole prompt.
        """
        check_prompt(self.plan, prompt_length)
        for layer in self.compressed_layers:
            layer.prompt_checked = True

    def allocate(self) -> None:
        """Compress the layers waiting for the plan's global allocation: one top-k over the scores of every head
        of every such layer for their total budget, each head keeping at least the plan's ``floor`` share of its
        layer's budget (:func:`headwise.budgets.adaptive_counts`, AdaKV's rule over the whole model)."""
        waiting = [layer for layer in self.compressed_layers if layer.pending is not None]
        if not waiting:
            return
        pending = [layer.pending for layer in waiting]
        total = sum(budget * len(scores) for scores, budget, _ in pending)
        floor = min(floor_tokens(budget, self.plan.floor) for _, budget, _ in pending)
        counts = iter(adaptive_counts([s.mean(dim=0) for scores, _, _ in pending for s in scores], total, floor))
        for layer, (scores, _, valid) in zip(waiting, pending, strict=True):
            layer.pending = None
            layer.keep_top(scores, [next(counts) for _ in scores], valid)

    def seal(self) -> None:
        """Stop compressing after multi-token forwards (the context is done; questions come next)."""
        for layer in self.compressed_layers:
            layer.sealed = True

    def computed_fraction(self) -> float:
        """Of the causal attention of the multi-token forwards (query, key pairs, all heads), the fraction sparse
        prefill computed: the pairs inside the blocks its patterns selected (1.0 without a sparse plan)."""
        layers = self.compressed_layers
        causal = sum(sum(layer.pairs_causal.values()) for layer in layers)
        return sum(sum(layer.pairs_computed.values()) for layer in layers) / causal if causal else 1.0

    def computed_fractions(self) -> list[list[float]]:
        """:meth:`computed_fraction` per compressed layer and KV head (1.0 where nothing was counted)."""
        return [[layer.pairs_computed[h] / layer.pairs_causal[h] if layer.pairs_causal.get(h) else 1.0
                 for h in range(len(layer.heads))] for layer in self.compressed_layers]

    def read_by(self, select: Selector | None) -> None:
        """From the next decoding step on, read by ``select`` (None: every token), whatever the plan said, and
        count reads afresh: a sealed context measured under several rules, say. The plan is replaced, not
        changed, so caches that share it are not affected."""
        self.plan = dataclasses.replace(self.plan, select=select)
        for layer in self.compressed_layers:
            layer.plan = self.plan
            layer.read_tokens, layer.held_tokens = 0.0, 0
            for h, head in enumerate(layer.heads):
                head.reads = select.for_head(layer.layer_idx, h) if select is not None else None
                head.selection = None
        if select is not None:
            select.bind(self.model_config)

    def kept(self) -> list[list[int]]:
        """Tokens kept per compressed layer and KV head."""
        return [layer.kept() for layer in self.compressed_layers]

    def held_positions(self) -> dict[int, list[torch.Tensor]]:
        """The positions each KV head holds (batch row 0, int64), by the index of each compressed layer."""
        return {layer.layer_idx: [h.positions[0].long() for h in layer.heads] for layer in self.compressed_layers}

    def metadata_bytes(self) -> int:
        return sum(layer.metadata_bytes() for layer in self.compressed_layers)

    def read_fraction(self) -> float:
        """Of the tokens the compressed layers held at decoding steps, the fraction those steps read, choosing
        included (1.0 without decode-time selection, or before any step; above 1 where choosing cost more than
        it saved)."""
        held = sum(layer.held_tokens for layer in self.compressed_layers)
        return sum(layer.read_tokens for layer in self.compressed_layers) / held if held else 1.0

    def describe(self) -> str:
        return self.plan.describe()

    # saving and loading -----------------------------------------------------------------------------------

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """What the cache holds, as named tensors (for :func:`safetensors.torch.save_file`).

        Per compressed layer ``i`` and KV head ``h``: ``i.h.keys``, ``.values``, ``.positions``, ``.state`` (and
        the compensation token's ``.summary_keys``, ``.summary_values``, ``.evicted`` once it exists), plus the
        layer's logical length ``i.seen`` (and act's statistics per position, ``i.sink_received`` and
        ``i.sink_viewers``, where it calibrates). A transformers layer (sliding window) is saved as ``i.keys``,
        ``i.values`` and its logical length ``i.seen``. :meth:`from_tensors` reads them back.
        """
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if not layer.is_initialized:
                continue
            out[f"{i}.seen"] = torch.tensor([layer.get_seq_length()])
            if not isinstance(layer, CompressedLayer):
                out[f"{i}.keys"], out[f"{i}.values"] = layer.keys.contiguous(), layer.values.contiguous()
                continue
            if layer.sink_stats is not None:
                out[f"{i}.sink_received"], out[f"{i}.sink_viewers"] = (t.clone() for t in layer.sink_stats)
            for h, head in enumerate(layer.heads):
                named = {"keys": head.keys, "values": head.values, "positions": head.positions, "state": head.state}
                if head.summary is not None:
                    named |= {"summary_keys": head.summary[0], "summary_values": head.summary[1],
                              "evicted": head.evicted}
                out |= {f"{i}.{h}.{name}": t.clone(memory_format=torch.contiguous_format) for name, t in named.items()}
        return out

    @classmethod
    def from_tensors(cls, config, plan: Plan, tensors: dict[str, torch.Tensor]) -> HeadwiseCache:
        """A sealed cache holding ``tensors`` (from :meth:`to_tensors` of a cache of the same model and plan)."""
        cache = cls(config, plan)
        for i, layer in enumerate(cache.layers):
            if f"{i}.seen" not in tensors:
                continue
            seen = int(tensors[f"{i}.seen"][0])
            if not isinstance(layer, CompressedLayer):
                layer.update(tensors[f"{i}.keys"], tensors[f"{i}.values"])
                if hasattr(layer, "cumulative_length"):  # a sliding window holds fewer tokens than it has seen
                    layer.cumulative_length = seen
                continue
            heads = [key[len(f"{i}."):-len(".keys")] for key in tensors
                     if key.startswith(f"{i}.") and key.endswith(".keys")]
            first = tensors[f"{i}.0.keys"]
            layer.lazy_initialization(first.new_zeros(first.shape[0], len(heads), 0, first.shape[-1]), first)
            for h, head in enumerate(layer.heads):
                head.keys, head.values = tensors[f"{i}.{h}.keys"], tensors[f"{i}.{h}.values"]
                head.positions, head.state = tensors[f"{i}.{h}.positions"], tensors[f"{i}.{h}.state"]
                if f"{i}.{h}.evicted" in tensors:
                    head.summary = (tensors[f"{i}.{h}.summary_keys"], tensors[f"{i}.{h}.summary_values"])
                    head.evicted = tensors[f"{i}.{h}.evicted"]
            layer.seen, layer.prompt_checked = seen, True
            if f"{i}.sink_received" in tensors and plan.act is not None and layer.calibrated:
                layer.sink_stats = (tensors[f"{i}.sink_received"], tensors[f"{i}.sink_viewers"])
                layer.sinks = hidden_sinks(*layer.sink_stats, plan.act.threshold)
        cache.seal()
        return cache

