"""Prompt building and a small generation loop that measures what headwise cares about.

The loop is explicit (prefill, then one token at a time) rather than ``model.generate`` so that it can
prefill in chunks, time prefill and decoding separately, and report the KV-cache bytes actually held.
``model.generate`` works with headwise caches too (see :mod:`headwise.api`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache

from headwise.compat import forward
from headwise.errors import HeadwiseError
from headwise.models import LoadedModel


@dataclass(frozen=True)
class Sampling:
    """Decoding settings: greedy when ``temperature`` is 0."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise HeadwiseError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise HeadwiseError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise HeadwiseError(f"top-k must be >= 0, got {self.top_k}")


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token id per row of ``logits`` (shape ``[batch, vocab]``)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature  # a bfloat16 model's logits are too coarse to sample from
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) > sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _prompt_ids(lm: LoadedModel, text: str, use_chat: bool) -> list[int]:
    tok = lm.tokenizer
    if use_chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        return list(ids)
    ids = tok(text)["input_ids"]
    bos = getattr(tok, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos) and lm.info.model_type.startswith("gemma"):
        ids = [bos, *ids]
    return list(ids)


def _longest_end_at(text: str, cuts: Sequence[int], fits: Callable[[str], bool]) -> str:
    """``text[cut:]`` for the smallest of the increasing ``cuts`` that ``fits``, or ``""``.

    Searched from the end (1, 2, 4, ... cuts back, then bisection), so a long text is tokenized only a few
    times, at about the length that is kept.
    """
    good, back = 0, 1
    while back <= len(cuts) and fits(text[cuts[-back]:]):
        good, back = back, 2 * back
    bad = min(back, len(cuts) + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(text[cuts[-mid]:]) else (good, mid)
    return text[cuts[-good]:] if good else ""


def longest_fitting_end(text: str, fits: Callable[[str], bool]) -> str:
    """The longest end of ``text`` for which ``fits`` holds, given that the whole ``text`` does not fit.

    The end starts at a word when one fits, else at any character; ``""`` when not even one character fits.
    """
    words = [m.start() for m in re.finditer(r"(?<!\S)\S", text)]
    return _longest_end_at(text, words, fits) or _longest_end_at(text, range(len(text)), fits)


def build_prompt(lm: LoadedModel, text: str, *, chat: bool | None = None, max_tokens: int | None = None) -> list[int]:
    """Token ids for ``text``; instruct models get their chat template with a generation prompt.

    With ``max_tokens``, a prompt longer than that loses the start of ``text`` (the chat template and the BOS
    token stay whole): the longest end of ``text`` whose prompt fits in ``max_tokens`` is kept.
    """
    if not text.strip():
        raise HeadwiseError("the prompt is empty")
    use_chat = lm.instruct if chat is None else chat
    ids = _prompt_ids(lm, text, use_chat)
    if max_tokens is None or len(ids) <= max_tokens:
        return ids

    def fits(end: str) -> bool:
        return len(_prompt_ids(lm, end, use_chat)) <= max_tokens

    kept = longest_fitting_end(text, fits)
    if not kept.strip():
        raise HeadwiseError(f"the prompt cannot be truncated to {max_tokens} tokens: no room is left for its text")
    return _prompt_ids(lm, kept, use_chat)


def prompt_room(context_length: int, max_new_tokens: int) -> int:
    """Tokens a prompt may have so that ``max_new_tokens`` still fit in the context."""
    room = context_length - max_new_tokens
    if room <= 0:
        raise HeadwiseError(f"max new tokens ({max_new_tokens}) must be below the context length ({context_length})")
    return room


def check_length(prompt_ids: list[int], context_length: int, max_new_tokens: int) -> None:
    """Refuse a prompt that leaves no room for ``max_new_tokens`` (``build_prompt(max_tokens=...)`` truncates)."""
    room = prompt_room(context_length, max_new_tokens)
    if len(prompt_ids) > room:
        raise HeadwiseError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context is {context_length} "
            f"(with {max_new_tokens} new tokens); shorten it or pass --truncate to cut the start of its text "
            f"to fit {room} tokens"
        )


def cache_bytes(cache: Cache) -> int:
    """Bytes physically held by the key and value tensors of a cache (any headwise or transformers cache)."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


@dataclass
class GenerationResult:
    """What one generation produced and what it cost."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    kv_bytes: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(len(self.token_ids) - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: Cache,
    *,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the prompt through ``model`` into ``cache`` (in chunks when asked); return the last logits.

    Every forward goes through :func:`headwise.compat.forward`, which raises if the cache did not take the tokens.
    With ``progress``, a bar on stderr advances as each decoder layer of each chunk finishes.
    """
    if cache.get_seq_length() == 0 and hasattr(cache, "check_prompt"):
        cache.check_prompt(input_ids.shape[1])  # the whole prompt, before its chunks
    step = chunk_size or input_ids.shape[1]
    starts = range(0, input_ids.shape[1], step)
    logits = None
    with layer_progress(model, len(starts), f"prefill {input_ids.shape[1]} tokens", enabled=progress) as tick:
        for start in starts:
            # logits_to_keep=1: only the last position's logits (a 4K prompt's full logits would be 750 MiB).
            out = forward(model, cache, input_ids[:, start : start + step], logits_to_keep=1)
            logits = out.logits[:, -1, :]
            tick()
    assert logits is not None
    return logits


@contextmanager
def layer_progress(model: torch.nn.Module, forwards: int, desc: str, *, enabled: bool) -> Iterator[Callable[[], None]]:
    """A progress bar over ``forwards`` forward passes of ``model``, one step per decoder layer.

    The layers are found through ``model.get_decoder().layers`` and counted with forward hooks (public torch
    API; removed on exit). A model without that layout advances once per forward, through the callable
    this yields, which is to be called after each forward. Disabled, it adds nothing to the forward.
    """
    if not enabled:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    per_forward = len(layers) if isinstance(layers, torch.nn.ModuleList) else 0
    bar = tqdm(total=forwards * max(per_forward, 1), desc=desc, unit="layer" if per_forward else "forward",
               mininterval=0)  # a few dozen layers per forward: show every one

    def advance(*_: object) -> None:  # a forward hook that returned a value would replace the layer's output
        bar.update(1)

    hooks = [layer.register_forward_hook(advance) for layer in layers] if per_forward else []
    try:
        yield (lambda: None) if per_forward else (lambda: bar.update(1))
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    logits: torch.Tensor,
    cache: Cache,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: set[int],
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to ``max_new_tokens`` for a single sequence from the prefill's last ``logits``."""
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.temperature > 0 else None
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = next_token(logits, sampling, generator)
        tokens.append(int(token[0]))
        if on_token is not None:
            on_token(tokens[-1])
        if tokens[-1] in stop_ids or len(tokens) == max_new_tokens:
            break
        out = forward(model, cache, token.view(1, 1))
        logits = out.logits[:, -1, :]
    return tokens


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Token ids that end a reply: the tokenizer's and the generation config's end-of-sequence ids."""
    ids: set[int] = set()
    for source in (lm.tokenizer.eos_token_id, getattr(lm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>") if lm.instruct else None
    if isinstance(im_end, int) and im_end != lm.tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def generate(
    lm: LoadedModel,
    prompt_ids: list[int],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling | None = None,
    cache: Cache | None = None,
    chunk_size: int | None = None,
    on_token: Callable[[int], None] | None = None,
    progress: bool = False,
) -> GenerationResult:
    """Prefill ``prompt_ids`` (with a progress bar when asked) then decode, timing both and measuring the cache
    bytes at the end."""
    sampling = sampling or Sampling()
    cache = cache if cache is not None else DynamicCache(config=lm.model.config)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    start = time.perf_counter()
    logits = prefill(lm.model, input_ids, cache, chunk_size=chunk_size, progress=progress)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokens = decode(
        lm.model, logits, cache, max_new_tokens=max_new_tokens, sampling=sampling,
        stop_ids=stop_token_ids(lm), on_token=on_token,
    )
    decode_seconds = time.perf_counter() - start
    return GenerationResult(
        token_ids=tokens,
        text=lm.tokenizer.decode(tokens, skip_special_tokens=True),
        prompt_tokens=len(prompt_ids),
        kv_bytes=cache_bytes(cache),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
    )
