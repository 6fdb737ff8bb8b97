"""ACT: attention-sink calibration in chosen heads, with no training.

Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training
through Attention Calibration" (ICML 2024). Beyond the first token, some keys draw far more attention than their
content deserves ("hidden sinks"). ACT finds them per head from the input's attention map: a key is a sink when the
mean attention it receives, over the query rows that can see it (causal), exceeds a threshold (0.1). The first sink,
normally the initial token (the ordinary attention sink), is left alone; the attention to every other sink is
multiplied by ``beta`` (0.4) and the removed mass goes to the row's other keys in proportion to their weights, so
each row still sums to 1.

Here the calibrated heads are the query heads a head profile (``headwise profile``) labels ``sink``; the paper
selects them on a calibration set. Only the layers the headwise cache holds (full attention) are calibrated: the
sliding-window layers of a model such as Gemma 3 keep transformers' own attention.

It changes attention, not memory: an option to measure (``--act`` of ``headwise generate`` and ``headwise bench``).
The cache side (statistics per position, the two passes over a prompt's queries) is
:meth:`headwise.cache.CompressedLayer.attend`; this module holds the rule and its options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from headwise import specs
from headwise.errors import HeadwiseError
from headwise.profile.schema import HeadProfile

SINK_ROLE = "sink"


def hidden_sinks(received: torch.Tensor, viewers: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which keys are hidden sinks: bool of ``received``'s shape.

    ``received`` [..., n] is the attention each key received, summed over the query rows; ``viewers`` (broadcastable
    to it, [n] say) is how many rows could see each key. A key is a sink where ``received / viewers > threshold``,
    except the first such key along the last dimension (the ordinary attention sink, left alone). A key no row could
    see is never a sink.
    """
    viewers = torch.as_tensor(viewers, device=received.device)
    seen = viewers > 0
    over = seen & (received / torch.where(seen, viewers, 1).to(received.dtype) > threshold)
    first = over & (over.long().cumsum(dim=-1) == 1)
    return over & ~first


def recalibrate(weights: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """``weights`` [..., q, n] (rows summing to 1, float32) with the weight of every key in ``sinks`` (bool,
    broadcastable to [..., 1, n]) multiplied by ``beta`` and the mass removed given to the row's other keys in
    proportion to their weights, so each row still sums to 1. A row whose other keys hold no mass is returned
    unchanged (there is nowhere to put what it would remove)."""
    sinks = sinks.expand_as(weights)
    others = weights.masked_fill(sinks, 0.0)
    other_mass = others.sum(dim=-1, keepdim=True)
    removed = (1 - beta) * (weights - others).sum(dim=-1, keepdim=True)
    scale = 1 + removed / torch.where(other_mass > 0, other_mass, 1.0)
    calibrated = torch.where(sinks, weights * beta, others * scale)
    return torch.where(other_mass > 0, calibrated, weights)


@dataclass
class SinkCalibration:
    """ACT on the query heads a head profile labels ``sink`` (see the module docstring).

    Parameters
    ----------
    profile : str
        A ``profile.json`` from ``headwise profile``, made for the model it is used with (checked by :meth:`bind`).
    beta : float
        What the attention to a hidden sink is multiplied by, in [0, 1] (1: no change).
    threshold : float
        The mean received attention above which a key is a sink, in (0, 1].
    """

    profile: str
    beta: float = 0.4
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.beta <= 1:
            raise HeadwiseError(f"act beta must be in [0, 1], got {self.beta}")
        if not 0 < self.threshold <= 1:
            raise HeadwiseError(f"act threshold must be in (0, 1], got {self.threshold}")
        self._profile = HeadProfile.load(Path(self.profile))
        self._heads = [
            [h for h, role in enumerate(roles) if role == SINK_ROLE] if kind == "full_attention" else []
            for roles, kind in zip(self._profile.roles, self._profile.layer_types, strict=True)
        ]
        if not any(self._heads):
            raise HeadwiseError(f"the profile {self.profile} labels no query head of a full-attention layer "
                                f"'{SINK_ROLE}': act would calibrate nothing")

    def bind(self, config) -> None:
        """Refuse a model other than the one the profile was made for."""
        self._profile.check_config(config)

    def heads(self, layer_idx: int) -> list[int]:
        """The query heads of layer ``layer_idx`` that are calibrated (sorted; empty for none)."""
        return list(self._heads[layer_idx])

    def count(self) -> int:
        """How many query heads are calibrated, over every layer."""
        return sum(len(layer) for layer in self._heads)

    def describe(self) -> str:
        """The calibration in a few words: its profile, options and the number of heads it calibrates."""
        return f"act {self.profile} (beta {self.beta}, threshold {self.threshold}, {self.count()} sink heads)"


def parse_calibration(text: str) -> SinkCalibration:
    """``"PROFILE.json[:beta=B,threshold=T]"`` -> a :class:`SinkCalibration` (the form ``--act`` takes)."""
    path, options = specs.parse_spec("act", text)
    if not path.endswith(".json"):
        raise HeadwiseError(f"act takes PROFILE.json[:beta=B,threshold=T] (a profile from `headwise profile`), "
                            f"got '{text}'")
    return specs.build({"act": SinkCalibration}, "act", "act", options, given={"profile": path})
