"""Random eviction: the floor any real method must beat."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import Policy


def stream_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every one of ``parts`` (the same parts give the same seed in any run)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class Random(Policy):
    """Keep a uniformly random subset, drawn anew for every (layer, KV head) and reproducible from ``seed``.

    Parameters
    ----------
    seed : int
        Seed of the run: each head's generator is seeded from it, the head's layer and index and the tokens
        it holds, so heads drop different tokens and the same seed gives the same choice for the same cache.
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._head: tuple[int, ...] = ()  # (layer, KV head) once for_head made this head's copy

    def for_head(self, layer_idx: int, head: int) -> Policy:
        own = dataclasses.replace(self)
        own._head = (layer_idx, head)
        return own

    def score(
        self, keys: torch.Tensor, values: torch.Tensor, state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, *self._head, positions.shape[-1]))
        return torch.rand(positions.shape, generator=generator).to(keys.device)
