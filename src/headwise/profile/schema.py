"""The :class:`HeadProfile` file format: JSON with a schema version, saved atomically, validated on load."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from headwise.errors import HeadwiseError
from headwise.profile.metrics import ROLES
from headwise.report.html import write_atomic

SCHEMA_VERSION = 1
LAYER_TYPES = ("full_attention", "sliding_attention")


def _to_json_floats(rows: list[list[float]]) -> list[list[float | None]]:
    """NaN (a metric that could not be measured) becomes null: JSON has no NaN."""
    return [[None if math.isnan(v) else round(v, 6) for v in row] for row in rows]


def _from_json_floats(rows: list[list[float | None]]) -> list[list[float]]:
    return [[float("nan") if v is None else float(v) for v in row] for row in rows]


@dataclass
class HeadProfile:
    """What each attention head of a model does, measured on calibration inputs.

    Attributes
    ----------
    model
        Model name (registry name or path).
    num_layers, num_heads, num_kv_heads
        Architecture, checked again on load.
    layer_types
        ``full_attention`` / ``sliding_attention`` per layer.
    settings
        How the profile was measured (lengths, runs, seed, windows, Python version of the prose, ...).
    thresholds
        The :class:`~headwise.profile.metrics.RoleThresholds` used for the roles.
    metrics
        Metric name -> ``[layers][num_heads]`` floats per query head (NaN where not measured).
    kv_metrics
        Metric name -> ``[layers][num_kv_heads]``, aggregated over each GQA group.
    roles, kv_roles
        Role per query head and per KV head.
    sinks
        Positions beyond the first that act as sinks: ``{"position", "token", "heads_gu", "heads_act"}``.
    retrieval_runs
        Needle-in-a-haystack runs: ``runs``, ``passed``, ``failed`` and the failed runs' details.
    """

    model: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    layer_types: list[str]
    settings: dict
    thresholds: dict
    metrics: dict[str, list[list[float]]]
    kv_metrics: dict[str, list[list[float]]]
    roles: list[list[str]]
    kv_roles: list[list[str]]
    sinks: list[dict] = field(default_factory=list)
    retrieval_runs: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def metric(self, name: str, *, kv: bool = False) -> torch.Tensor:
        """A metric as a ``[layers, heads]`` float tensor."""
        table = self.kv_metrics if kv else self.metrics
        if name not in table:
            raise HeadwiseError(f"the profile has no metric '{name}'; it has {sorted(table)}")
        return torch.tensor(table[name], dtype=torch.float64)

    def to_json(self) -> str:
        data = asdict(self)
        for key in ("metrics", "kv_metrics"):
            data[key] = {name: _to_json_floats(rows) for name, rows in data[key].items()}
        return json.dumps(data, indent=1, allow_nan=False) + "\n"

    def save(self, path: Path) -> None:
        """Write the profile as JSON, atomically."""
        write_atomic(Path(path), self.to_json())

    def validate(self) -> None:
        """Raise :class:`HeadwiseError` if shapes are inconsistent, or a role or layer type is unknown."""
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise HeadwiseError(f"{self.num_heads} heads cannot be grouped over {self.num_kv_heads} KV heads")
        for key, width in (("metrics", self.num_heads), ("kv_metrics", self.num_kv_heads)):
            for name, rows in getattr(self, key).items():
                if len(rows) != self.num_layers or any(len(r) != width for r in rows):
                    raise HeadwiseError(f"profile {key} '{name}' is not {self.num_layers} layers x {width} heads")
        for key, width in (("roles", self.num_heads), ("kv_roles", self.num_kv_heads)):
            rows = getattr(self, key)
            if len(rows) != self.num_layers or any(len(r) != width for r in rows):
                raise HeadwiseError(f"profile {key} is not {self.num_layers} layers x {width} heads")
        if len(self.layer_types) != self.num_layers:
            raise HeadwiseError(f"profile has {len(self.layer_types)} layer types for {self.num_layers} layers")
        roles = {str(r) for rows in (self.roles, self.kv_roles) for row in rows for r in row}
        layer_types = {str(t) for t in self.layer_types}
        for what, found, known in (("role", roles, ROLES), ("layer type", layer_types, LAYER_TYPES)):
            unknown = sorted(found - set(known))
            if unknown:
                raise HeadwiseError(f"profile has unknown {what}(s) {', '.join(unknown)}; known: {', '.join(known)}")

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Raise :class:`HeadwiseError` unless the profile was made for a model of this shape."""
        got = (self.num_layers, self.num_heads, self.num_kv_heads)
        if got != (num_layers, num_heads, num_kv_heads):
            raise HeadwiseError(
                f"the profile of '{self.model}' has {got[0]} layers, {got[1]} heads, {got[2]} KV heads but the model "
                f"has {num_layers}, {num_heads}, {num_kv_heads}: profile this model with `headwise profile`"
            )

    def check_config(self, config) -> None:
        """Raise :class:`HeadwiseError` unless the profile was made for the model of this transformers config.

        The model's name is the last part of ``config.name_or_path`` (a registry model's cache folder is named
        after it; a tiny test model built from a config has none, and then only the architecture is checked):
        it must be the profile's ``model``; the shape and layer types must match as well.
        """
        name = Path(getattr(config, "name_or_path", "") or "").name
        if name and name != self.model:
            raise HeadwiseError(
                f"the profile was made for model '{self.model}' but the model loaded is '{name}': "
                "profile this model with `headwise profile`"
            )
        text = config.get_text_config()
        self.check_model(text.num_hidden_layers, text.num_attention_heads,
                         getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
        if layer_types != self.layer_types:
            i = next(i for i, (a, b) in enumerate(zip(self.layer_types, layer_types, strict=True)) if a != b)
            raise HeadwiseError(
                f"the profile of '{self.model}' has other layer types than the model (layer {i}: "
                f"{self.layer_types[i]} in the profile, {layer_types[i]} in the model): profile this model with "
                "`headwise profile`"
            )

    @classmethod
    def load(cls, path: Path, *, expect: tuple[int, int, int] | None = None) -> HeadProfile:
        """Read and validate a profile; ``expect`` = ``(layers, heads, kv_heads)`` of the model it will serve."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise HeadwiseError(f"no profile at '{path}': run `headwise profile --out DIR` first") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeadwiseError(
                f"the profile '{path}' is corrupted or not JSON ({exc}); profile the model again"
            ) from exc
        if not isinstance(data, dict):
            raise HeadwiseError(f"the profile '{path}' is not a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise HeadwiseError(
                f"the profile '{path}' has schema version {version!r}; this headwise reads version {SCHEMA_VERSION}: "
                "profile the model again"
            )
        try:
            for key in ("metrics", "kv_metrics"):
                data[key] = {name: _from_json_floats(rows) for name, rows in data[key].items()}
            profile = cls(**data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise HeadwiseError(f"the profile '{path}' is missing or has malformed fields ({exc})") from exc
        profile.validate()
        if expect is not None:
            profile.check_model(*expect)
        return profile
