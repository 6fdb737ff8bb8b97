"""Per-head attention statistics accumulated one block of queries at a time.

Every statistic is a running sum plus a count, so a long input never needs its full ``n x n`` attention map:
the attention function hands :meth:`AttentionRecorder.record` the softmax probabilities of a block of queries
(shape ``[heads, block, keys]``), the boolean mask of allowed keys for that block and the absolute positions of
its queries. The sums are kept in float64 so that blocked and dense computations agree to tight tolerances.

Statistics (all per query head):

- attention *received* by each key position, with the number of queries allowed to see it (the mean is the
  sink score of Gu et al. 2024, "When attention sink emerges in language models"; StreamingLLM, Xiao et al.
  2023, keeps such positions);
- *locality*: attention mass inside the first ``n_sink`` positions plus a recent window of ``w`` keys, for
  several ``w``;
- *entropy* of each query's attention distribution (nats);
- *previous-token* mass: attention from position ``i`` to ``i - 1``;
- *induction* mass (Olsson et al. 2022): attention from a token to the position after the previous occurrence
  of the same token (needs the input ids, see :func:`induction_targets`);
- the *argmax* key position of every query (for the copy-paste retrieval score of Wu et al. 2024);
- a downsampled attention map (``map_size x map_size`` pooled: sum over a key bin, mean over a query bin).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headwise.errors import HeadwiseError


@dataclass(frozen=True)
class CaptureSettings:
    """What to accumulate and how.

    Parameters
    ----------
    windows
        Recent-window sizes (in keys, the query included) for the locality statistic.
    n_sink
        Number of leading positions counted as sinks in the locality statistic.
    map_size
        Side of the pooled attention map per head; maps are recorded only for passes without a cache prefix.
    block_size
        Most queries processed at once; lowered automatically so one block holds at most ``block_elements``
        scores.
    block_elements
        Upper bound on ``heads * block * keys`` per block (memory of a block is a few times this, in float32).
    keep_argmax
        Whether to keep the most-attended key of every query of every pass.
    argmax_only
        Keep only the argmax (what the retrieval score needs) and skip every other statistic.
    """

    windows: tuple[int, ...] = (16, 64, 256, 1024)
    n_sink: int = 4
    map_size: int = 64
    block_size: int = 256
    block_elements: int = 16 * 2**20
    keep_argmax: bool = True
    argmax_only: bool = False

    def __post_init__(self) -> None:
        if not self.windows or min(self.windows) < 1:
            raise HeadwiseError(f"locality windows must be positive, got {self.windows}")
        if self.n_sink < 0 or self.map_size < 1 or self.block_size < 1 or self.block_elements < 1:
            raise HeadwiseError("n_sink must be >= 0 and map_size, block_size, block_elements >= 1")

    def block_for(self, heads: int, keys: int) -> int:
        """Queries per block for ``heads`` heads over ``keys`` keys."""
        return max(1, min(self.block_size, self.block_elements // max(1, heads * keys)))


def induction_targets(token_ids: torch.Tensor) -> torch.Tensor:
    """For each position ``i``, the position after the previous occurrence of ``token_ids[i]``, or -1.

    This is where an induction head (Olsson et al. 2022) looks: having seen ``A B ... A``, it attends to ``B``.

    Parameters
    ----------
    token_ids
        1-D tensor of token ids.

    Returns
    -------
    torch.Tensor
        1-D long tensor of the same length.
    """
    last: dict[int, int] = {}
    out = torch.full((token_ids.numel(),), -1, dtype=torch.long)
    for i, tok in enumerate(token_ids.tolist()):
        if tok in last:
            out[i] = last[tok] + 1
        last[tok] = i
    return out


def _column(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[h, i, index[i]]`` for ``values`` ``[heads, rows, keys]``: one column per row."""
    return values.gather(-1, index.expand(values.shape[0], -1)[..., None])[..., 0]


def window_mass(cum: torch.Tensor, q_pos: torch.Tensor, window: int, n_sink: int) -> torch.Tensor:
    """Attention mass on the sinks plus the recent window, ``[heads, queries]``, from row-wise cumulative sums.

    ``cum`` is ``probs.cumsum(-1)``. A key ``k`` is a sink when ``k < n_sink`` and in the recent window when
    ``q - window < k <= q``; for queries at ``q >= window + n_sink`` the two sets are disjoint, so the mass is
    ``cum[n_sink - 1] + cum[q] - cum[q - window]``. Rows of earlier queries are meaningless; callers mask them.
    """
    mass = _column(cum, q_pos) - _column(cum, (q_pos - window).clamp(min=0))
    if n_sink:
        mass = mass + cum[:, :, n_sink - 1]
    return mass


def pooled_map(probs: torch.Tensor, q_pos: torch.Tensor, kv_len: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool a block of attention rows into a ``size x size`` grid over a sequence of ``kv_len`` positions.

    The rows may cover only the first keys (``probs.shape[-1] <= kv_len``, the rest having no attention).
    Position ``p`` falls in bin ``p * size // kv_len``. Returns the per-bin sums ``[heads, size, size]`` (summed
    over the keys and the queries of each bin) and the number of queries per query bin ``[size]``; dividing the
    first by the second gives, per query bin, the mean attention mass on each key bin.
    """
    heads, block, width = probs.shape
    key_bin = torch.arange(width) * size // kv_len
    q_bin = q_pos * size // kv_len
    per_query = torch.zeros(heads, block, size, dtype=probs.dtype).index_add_(2, key_bin, probs)
    sums = torch.zeros(heads, size, size, dtype=torch.float64).index_add_(1, q_bin, per_query.double())
    rows = torch.zeros(size, dtype=torch.float64).index_add_(0, q_bin, torch.ones(block, dtype=torch.float64))
    return sums, rows


def _grow(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the last dimension of ``t`` with zeros up to ``length``."""
    if t.shape[-1] >= length:
        return t
    return torch.nn.functional.pad(t, (0, length - t.shape[-1]))


@dataclass
class LayerStats:
    """Running sums for one attention layer (per query head)."""

    num_heads: int
    settings: CaptureSettings
    received: torch.Tensor = field(init=False)
    visible: torch.Tensor = field(init=False)
    entropy_sum: torch.Tensor = field(init=False)
    queries: int = 0
    prev_sum: torch.Tensor = field(init=False)
    prev_count: int = 0
    induction_sum: torch.Tensor = field(init=False)
    induction_count: int = 0
    local_sum: torch.Tensor = field(init=False)
    local_count: torch.Tensor = field(init=False)
    map_sum: torch.Tensor = field(init=False)
    map_rows: torch.Tensor = field(init=False)
    argmax: list[torch.Tensor] = field(default_factory=list)
    key_lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        h, s, nw = self.num_heads, self.settings.map_size, len(self.settings.windows)
        f64 = torch.float64
        self.received = torch.zeros(h, 0, dtype=f64)
        self.visible = torch.zeros(0, dtype=f64)
        self.entropy_sum = torch.zeros(h, dtype=f64)
        self.prev_sum = torch.zeros(h, dtype=f64)
        self.induction_sum = torch.zeros(h, dtype=f64)
        self.local_sum = torch.zeros(h, nw, dtype=f64)
        self.local_count = torch.zeros(nw, dtype=f64)
        self.map_sum = torch.zeros(h, s, s, dtype=f64)
        self.map_rows = torch.zeros(s, dtype=f64)

    def add_block(
        self, probs: torch.Tensor, allowed: torch.Tensor, q_pos: torch.Tensor, targets: torch.Tensor | None,
        *, map_len: int | None, key_len: int,
    ) -> None:
        """Accumulate one block: ``probs`` ``[heads, block, keys]``, ``allowed`` ``[block, keys]``.

        ``q_pos`` holds the absolute positions of the block's queries; ``targets`` the induction target position
        of each query (-1 for none) or None when the input ids are unknown. ``map_len`` is the sequence length
        for the pooled map, or None to leave the map out. The keys may stop after the block's last query;
        ``key_len`` is the number of keys the layer held (kept with each argmax block: a sliding-window cache
        layer holds only the last keys, so its index ``j`` is position ``j + total_length - key_len``).
        """
        block, width = probs.shape[1:]
        cfg = self.settings
        if cfg.keep_argmax or cfg.argmax_only:
            self.argmax.append(probs.argmax(-1).to(torch.int32))
            self.key_lengths.append(key_len)
        if cfg.argmax_only:
            return
        self.received = _grow(self.received, width)
        self.visible = _grow(self.visible, width)
        self.received[:, :width] += probs.sum(1).double()  # sum in float32: no float64 copy of the block
        self.visible[:width] += allowed.sum(0).double()
        self.entropy_sum -= torch.special.xlogy(probs, probs).sum(-1).sum(-1, dtype=torch.float64)
        self.queries += block

        has_prev = q_pos >= 1
        if has_prev.any():
            prev = _column(probs[:, has_prev], q_pos[has_prev] - 1)
            self.prev_sum += prev.sum(-1, dtype=torch.float64)
            self.prev_count += int(has_prev.sum())
        if targets is not None:
            has_target = targets >= 0
            if has_target.any():
                hit = _column(probs[:, has_target], targets[has_target])
                self.induction_sum += hit.sum(-1, dtype=torch.float64)
                self.induction_count += int(has_target.sum())

        cum = None
        for i, w in enumerate(cfg.windows):
            counted = q_pos >= w + cfg.n_sink
            if counted.any():
                cum = probs.cumsum(-1) if cum is None else cum
                mass = window_mass(cum, q_pos, w, cfg.n_sink).masked_fill(~counted, 0.0)
                self.local_sum[:, i] += mass.sum(-1, dtype=torch.float64)
                self.local_count[i] += int(counted.sum())

        if map_len is not None:
            sums, rows = pooled_map(probs, q_pos, map_len, cfg.map_size)
            self.map_sum += sums
            self.map_rows += rows

    def received_mean(self) -> torch.Tensor:
        """Mean attention each key received from the queries allowed to see it, ``[heads, keys]`` (0 if none)."""
        return self.received / self.visible.clamp(min=1)

    def entropy(self) -> torch.Tensor:
        """Mean attention entropy per head (nats)."""
        return self.entropy_sum / max(self.queries, 1)

    def previous_token(self) -> torch.Tensor:
        """Mean attention from each query to the position just before it, per head."""
        return self.prev_sum / max(self.prev_count, 1)

    def induction(self) -> torch.Tensor:
        """Mean attention to the induction target, per head (NaN when no query had a target)."""
        if self.induction_count == 0:
            return torch.full_like(self.induction_sum, float("nan"))
        return self.induction_sum / self.induction_count

    def locality(self) -> torch.Tensor:
        """Mean mass inside sinks + recent window, ``[heads, windows]``, over queries at positions
        ``>= window + n_sink`` (NaN for a window no query reached)."""
        out = self.local_sum / self.local_count.clamp(min=1)
        out[:, self.local_count == 0] = float("nan")
        return out

    def attention_map(self) -> torch.Tensor:
        """Pooled attention map ``[heads, size, size]``: row = query bin, column = key bin, rows sum to 1."""
        return self.map_sum / self.map_rows.clamp(min=1)[None, :, None]


@dataclass
class AttentionRecorder:
    """Collects :class:`LayerStats` for every layer during a :func:`~headwise.capture.capture` block.

    Call :meth:`set_input` with the full token sequence before a pass to enable the induction statistic;
    positions are absolute (prefix from the cache included), so decoding steps line up with it.
    """

    settings: CaptureSettings = field(default_factory=CaptureSettings)
    layers: dict[int, LayerStats] = field(default_factory=dict)
    targets: torch.Tensor | None = None

    def set_input(self, token_ids: torch.Tensor | list[int] | None) -> None:
        """Token ids of the whole sequence (1-D), or None to switch the induction statistic off."""
        if token_ids is None:
            self.targets = None
            return
        self.targets = induction_targets(torch.as_tensor(token_ids).reshape(-1))

    def layer(self, index: int, num_heads: int) -> LayerStats:
        """Stats of layer ``index``, created on first use."""
        if index not in self.layers:
            self.layers[index] = LayerStats(num_heads, self.settings)
        return self.layers[index]

    def targets_for(self, q_pos: torch.Tensor) -> torch.Tensor | None:
        """Induction targets of the queries at ``q_pos`` (-1 beyond the known input)."""
        if self.targets is None:
            return None
        known = q_pos < self.targets.numel()
        out = torch.full_like(q_pos, -1)
        out[known] = self.targets[q_pos[known]]
        return out
