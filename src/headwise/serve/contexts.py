"""The server's context cache: compressed contexts kept by a hash of their tokens and plan, least recently used
out first, within a cap in bytes, and optionally saved to disk as safetensors.

A context is the long part of a request (:mod:`headwise.serve.prompts`), prefilled and compressed once without
the question and sealed. Every request that starts with the same tokens under the same plan decodes from its
own deep copy of it, so one compressed prefill answers many questions.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from headwise.cache import HeadwiseCache, Plan
from headwise.errors import HeadwiseError
from headwise.generation import cache_bytes


def context_key(identity: dict, tokens: list[int]) -> str:
    """Hex digest naming a compressed context: its ``identity`` (the model and every resolved option of the plan)
    and its token ids."""
    blob = json.dumps({"identity": identity, "tokens": tokens}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _identity_text(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


@dataclass
class Context:
    """A sealed compressed context and the logits after its last token (for a request with nothing after it)."""

    key: str
    cache: HeadwiseCache
    logits: torch.Tensor
    tokens: int

    @property
    def nbytes(self) -> int:
        """Bytes physically held: the cache's keys and values and the last logits."""
        return cache_bytes(self.cache) + self.logits.nbytes


class ContextCache:
    """Contexts by key, least recently used first out, holding at most ``cap_bytes`` (:attr:`Context.nbytes`).

    A context larger than the cap on its own is not kept (the request that made it still uses it).
    """

    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes < 0:
            raise HeadwiseError(f"the context cache's cap must be >= 0 bytes, got {cap_bytes}")
        self.cap_bytes = cap_bytes
        self.entries: OrderedDict[str, Context] = OrderedDict()

    def get(self, key: str) -> Context | None:
        """The context under ``key`` (now the most recently used), or None."""
        context = self.entries.get(key)
        if context is not None:
            self.entries.move_to_end(key)
        return context

    def put(self, context: Context) -> list[str]:
        """Keep ``context``, then drop the least recently used ones until the cap holds; return the keys dropped."""
        self.entries[context.key] = context
        self.entries.move_to_end(context.key)
        dropped = []
        while self.held_bytes() > self.cap_bytes:
            key, _ = self.entries.popitem(last=False)
            dropped.append(key)
        return dropped

    def held_bytes(self) -> int:
        return sum(c.nbytes for c in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)


def save_context(context: Context, folder: Path, identity: dict) -> Path:
    """Write ``context`` to ``folder/<key>.safetensors`` atomically (a temporary file renamed into place), with
    its ``identity`` in the file's metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{context.key}.safetensors"
    tensors = {f"cache.{name}": t for name, t in context.cache.to_tensors().items()}
    tensors["logits"] = context.logits.contiguous()
    fd, tmp = tempfile.mkstemp(prefix=f".{context.key}-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"tokens": str(context.tokens), "identity": _identity_text(identity)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_context(path: Path, config, plan: Plan, identity: dict) -> Context | None:
    """A context saved by :func:`save_context`, rebuilt as a sealed cache of ``plan`` for the model of ``config``;
    None when it was saved under another ``identity`` (another model or plan)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("identity") != _identity_text(identity):
            return None
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise HeadwiseError(f"cannot read the saved context '{path}': {exc}") from exc
    cache = {name.removeprefix("cache."): t for name, t in tensors.items() if name.startswith("cache.")}
    return Context(path.stem, HeadwiseCache.from_tensors(config, plan, cache), tensors["logits"],
                   int(metadata["tokens"]))
