"""A sparse plan: one pattern per KV head, planned from a head profile and kept in a file a user can edit.

MInference (Jiang et al. 2024) assigns each head a sparse pattern offline; here the assignment comes from the
profile's roles (:func:`headwise.policies.headwise.head_kinds`, the classification the head-aware policy and
selection share): streaming heads, which attend to sinks and their neighbours, take A-shape; retrieval heads, which
reach anywhere, stay dense (or take vertical-slash); the others take cumulative mass. Layers that are not full
attention (sliding windows) stay dense.

The file is JSON::

    {"model": "smollm2-135m", "num_layers": 30, "num_kv_heads": 3,
     "patterns": {"streaming": "ashape", "retrieval": "dense", "other": "mass:gamma=0.9"},
     "heads": [["streaming", "other", "retrieval"], ...]}

``heads`` holds one entry per layer and KV head: a name from ``patterns`` or a pattern in ``--sparse``'s form
(``"vertical_slash:vertical=4"``); ``"dense"`` computes every block by the dense path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from headwise.errors import HeadwiseError
from headwise.sparse.base import Pattern

ROLE_PATTERNS = {"streaming": "ashape", "retrieval": "dense", "other": "mass"}


def plan_from_profile(profile, patterns: dict[str, str] | None = None, retrieval_threshold: float = 0.1) -> dict:
    """The plan (as the file's dict) for a :class:`~headwise.profile.schema.HeadProfile`: each full-attention
    KV head named by its kind, the kinds mapped to ``patterns`` (default :data:`ROLE_PATTERNS`)."""
    from headwise.policies.headwise import head_kinds

    kinds, _ = head_kinds(profile, retrieval_threshold)
    heads = [[kinds.get((layer, h), "dense") for h in range(profile.num_kv_heads)]
             for layer in range(profile.num_layers)]
    return {"model": profile.model, "num_layers": profile.num_layers, "num_kv_heads": profile.num_kv_heads,
            "retrieval_threshold": retrieval_threshold, "patterns": dict(patterns or ROLE_PATTERNS), "heads": heads}


def plan_text(plan: dict) -> str:
    """The plan as its file's JSON, one line per layer so a person can read and edit it."""
    head = json.dumps({key: value for key, value in plan.items() if key != "heads"}, indent=1)
    layers = ",\n".join(f"  {json.dumps(layer)}" for layer in plan["heads"])
    return f'{head[:-2]},\n "heads": [\n{layers}\n ]\n}}\n'


def resolve(plan: dict, where: str) -> list[list[Pattern | None]]:
    """The patterns per layer and KV head of a plan dict (None: dense), every entry checked."""
    from headwise.sparse import parse_pattern

    named = plan.get("patterns", {})
    if not isinstance(named, dict) or not isinstance(plan.get("heads"), list):
        raise HeadwiseError(f"{where}: a sparse plan needs 'patterns' (an object) and 'heads' (a list per layer)")
    cache: dict[str, Pattern | None] = {}

    def pattern(entry: object) -> Pattern | None:
        spec = named.get(entry, entry) if isinstance(entry, str) else entry
        if not isinstance(spec, str):
            raise HeadwiseError(f"{where}: a head's pattern must be a string, not {entry!r}")
        if spec not in cache:
            cache[spec] = None if spec == "dense" else parse_pattern(spec)
        return cache[spec]

    return [[pattern(entry) for entry in layer] for layer in plan["heads"]]


@dataclass
class SparsePlan:
    """Per-head patterns from a plan file (``file``; write one with ``headwise sparse-plan``). It answers the
    cache like a pattern (:meth:`bind`, :meth:`for_head`); each head's pattern has its own block and options."""

    file: str

    def __post_init__(self) -> None:
        try:
            self._plan = json.loads(Path(self.file).read_text())
        except (OSError, ValueError) as exc:
            raise HeadwiseError(f"cannot read the sparse plan {self.file}: {exc}") from exc
        if not isinstance(self._plan, dict):
            raise HeadwiseError(f"{self.file}: a sparse plan is a JSON object")
        self._heads = resolve(self._plan, self.file)

    def bind(self, config) -> None:
        text = config.get_text_config()
        shape = (text.num_hidden_layers, getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        if [len(self._heads), *sorted({len(layer) for layer in self._heads})] != list(shape):
            raise HeadwiseError(f"the sparse plan {self.file} is for {self._plan.get('num_layers')} layers of "
                                f"{self._plan.get('num_kv_heads')} KV heads; the model has {shape[0]} of {shape[1]}")

    def for_head(self, layer_idx: int, head: int) -> Pattern | None:
        return self._heads[layer_idx][head]

    def describe(self) -> str:
        """The plan in a few words: its file and how many heads take each pattern."""
        return f"{self.file} (" + ", ".join(f"{name} {count}" for name, count in self.counts().items()) + " KV heads)"

    def counts(self) -> dict[str, int]:
        """How many KV heads take each pattern (by its name; ``dense`` for the dense ones)."""
        names = [pattern.name if pattern else "dense" for layer in self._heads for pattern in layer]
        return {name: names.count(name) for name in sorted(set(names))}
