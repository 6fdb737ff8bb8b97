"""Head-aware compression from a profile: retrieval heads keep their memory, the rest shrink.

The idea of DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", 2024) and RazorAttention (Tang et al., "RazorAttention: Efficient KV Cache Compression
Through Retrieval Heads", 2024): only a few heads need the whole context. DuoAttention learns which ones by
optimisation; here they come from a :class:`~headwise.profile.schema.HeadProfile` measured on calibration
inputs (``headwise profile``), with no training, and the memory of every shrunk head is freed.

Budgets are shared over all compressed KV heads of the model, so the total meets the requested ratio or
token budget exactly (see :func:`role_budgets`):

1. every head first gets a floor of ``sinks + window`` tokens (all a streaming head needs);
2. retrieval heads, strongest retrieval score first, then grow to the whole context;
3. the remaining heads (induction, mixed) share what is left, evenly, up to the whole context;
4. anything still left goes back to the streaming heads.

Streaming heads (profile roles ``local`` and ``sink``) keep the sinks plus the most recent tokens
(StreamingLLM); the others keep their top tokens by ``other`` (SnapKV by default). RazorAttention's
compensation token for the shrunk heads is the plan option ``compensate=true`` (it applies to any policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from headwise.errors import HeadwiseError
from headwise.policies.base import Policy
from headwise.policies.streaming_llm import StreamingLLM

STREAMING_ROLES = ("local", "sink")


def role_budgets(kinds: list[str], strength: list[float], n: int, total: int, floor: int) -> list[int]:
    """Tokens per head for heads of ``kinds`` ('retrieval', 'streaming' or 'other') out of ``n`` each.

    Parameters
    ----------
    kinds : list of str
        Role of each head.
    strength : list of float
        Retrieval score of each head; stronger retrieval heads are served first.
    n : int
        Tokens each head holds now.
    total : int
        Tokens to keep over all heads (clipped to ``len(kinds) * n``).
    floor : int
        Tokens every head gets before any head grows (clipped to ``n``).

    Returns
    -------
    list of int
        Per-head counts, each in ``[0, n]``, summing to ``min(total, len(kinds) * n)``.
    """
    heads = len(kinds)
    total = min(total, heads * n)
    floor = min(floor, n)
    if heads * floor >= total:
        share, extra = divmod(total, heads)
        return [share + (i < extra) for i in range(heads)]
    counts = [floor] * heads
    left = total - heads * floor
    retrieval = sorted((i for i, k in enumerate(kinds) if k == "retrieval"), key=lambda i: -strength[i])
    for i in retrieval:
        grow = min(n - counts[i], left)
        counts[i] += grow
        left -= grow
    for kind in ("other", "streaming"):
        group = [i for i, k in enumerate(kinds) if k == kind]
        while left > 0 and (open_heads := [i for i in group if counts[i] < n]):
            share, extra = divmod(left, len(open_heads))
            for rank, i in enumerate(open_heads):
                grow = min(n - counts[i], share + (rank < extra))
                counts[i] += grow
                left -= grow
    return counts


@dataclass
class HeadAware(Policy):
    """Role-based budgets per KV head from a head profile (see the module docstring).

    Parameters
    ----------
    profile : str
        Path of a ``profile.json`` written by ``headwise profile`` for this model.
    sinks : int
        First tokens every head keeps.
    window : int
        Recent tokens every head keeps (a streaming head keeps only sinks + window).
    other : str
        Policy that ranks tokens in retrieval heads that cannot keep everything and in the other heads.
    retrieval_threshold : float
        KV heads whose retrieval score reaches this are retrieval heads, whatever their profile role.
    """

    name: ClassVar[str] = "headwise"
    profile: str = ""
    sinks: int = 4
    window: int = 64
    other: str = "snapkv"
    retrieval_threshold: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        from headwise.policies import make_policy
        from headwise.profile.schema import HeadProfile

        if not self.profile:
            raise HeadwiseError("policy 'headwise' needs a profile: --profile FILE (from `headwise profile`)")
        if self.other in ("headwise", "full"):
            raise HeadwiseError(f"headwise: other must be a compressing policy, not '{self.other}'")
        self._profile = HeadProfile.load(self.profile)
        self._other = make_policy(self.other, {"sinks": self.sinks})
        self._streaming = StreamingLLM(sinks=self.sinks)
        retrieval = self._profile.kv_metrics.get("retrieval")
        self._kinds: dict[tuple[int, int], str] = {}
        self._strength: dict[tuple[int, int], float] = {}
        for layer, (roles, kind) in enumerate(zip(self._profile.kv_roles, self._profile.layer_types, strict=True)):
            if kind != "full_attention":
                continue
            for head, role in enumerate(roles):
                score = retrieval[layer][head] if retrieval else float("nan")
                score = 0.0 if score != score else score  # NaN: not measured
                is_retrieval = role == "retrieval" or score >= self.retrieval_threshold
                self._kinds[layer, head] = (
                    "retrieval" if is_retrieval else "streaming" if role in STREAMING_ROLES else "other"
                )
                self._strength[layer, head] = score
        self._memo: tuple[tuple[int, int], dict[tuple[int, int], int]] | None = None

    def bind(self, config) -> None:
        text = config.get_text_config()
        self._profile.check_model(text.num_hidden_layers, text.num_attention_heads,
                                  getattr(text, "num_key_value_heads", None) or text.num_attention_heads)

    def kinds(self) -> dict[tuple[int, int], str]:
        """Role used for budgets, per (layer, KV head) of the compressed layers."""
        return dict(self._kinds)

    def for_head(self, layer_idx: int, head: int) -> Policy:
        return self._streaming if self._kinds[layer_idx, head] == "streaming" else self._other

    def head_budgets(self, layer_idx: int, seen: int, budget: int) -> list[int]:
        if self._memo is None or self._memo[0] != (seen, budget):
            keys = list(self._kinds)
            counts = role_budgets([self._kinds[k] for k in keys], [self._strength[k] for k in keys], seen,
                                  budget * len(keys), self.sinks + self.window)
            self._memo = ((seen, budget), dict(zip(keys, counts, strict=True)))
        table = self._memo[1]
        heads = sum(1 for layer, _ in table if layer == layer_idx)
        return [table[layer_idx, h] for h in range(heads)]

    def score(self, keys, values, state, positions):
        raise HeadwiseError("policy 'headwise' scores through its per-head policies (for_head)")
