"""The model side of the server: one worker thread that serves queued requests in order.

Each request is a :class:`Job`. The worker finds its context in the :class:`~headwise.serve.contexts.ContextCache`
(a hit) or prefills and compresses it without the rest of the prompt, seals it and keeps it (a miss; a plan that
needs the dense prefill, KVzip's, builds it from one and the context's reconstruction: :func:`headwise.dense.prefill`),
then feeds the rest of the prompt to a deep copy and decodes. Text goes back through the job's ``emit`` callback as
it is generated. A job whose client went away (``cancelled``) is skipped if it has not started and stopped at its next
token if it has, so its place in the queue is freed. The queue holds at most ``max_queue`` waiting jobs; past
that :meth:`Engine.submit` raises :class:`Busy` (HTTP 429) instead of growing.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import headwise.attention
from headwise import dense
from headwise.api import make_plan
from headwise.bench.runner import resolved_options
from headwise.cache import HeadwiseCache
from headwise.errors import HeadwiseError
from headwise.generation import Sampling, decode, prefill, stop_token_ids
from headwise.models import LoadedModel
from headwise.serve.contexts import Context, ContextCache, context_key, load_context, save_context
from headwise.serve.metrics import Metrics
from headwise.serve.prompts import Prompt

log = logging.getLogger("headwise.serve")


class Busy(Exception):
    """The queue is full."""


class _Stop(Exception):
    """Raised from the token callback to end decoding (a stop string, or the client went away)."""


@dataclass(frozen=True)
class Compression:
    """How contexts are compressed (and read while decoding): the arguments of :func:`headwise.api.make_plan`."""

    policy: str = "full"
    ratio: float | None = None
    budget: int | None = None
    options: tuple[str, ...] = ()
    select: str | None = None

    def plan(self, prompt_length: int | None = None):
        return make_plan(self.policy, ratio=self.ratio, budget=self.budget, prompt_length=prompt_length,
                         options=list(self.options), select=self.select)


@dataclass
class Job:
    """One request for the worker. ``emit`` receives ``("text", str)`` pieces, then ``("done", finish_reason,
    usage)`` or ``("error", status, message)``; it is called from the worker thread."""

    prompt: Prompt
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    emit: Callable[..., None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The model, the context cache, the queue and the worker thread that serves it."""

    def __init__(self, lm: LoadedModel, compression: Compression, contexts: ContextCache, metrics: Metrics, *,
                 max_queue: int = 16, contexts_dir: Path | None = None) -> None:
        if max_queue < 1:
            raise HeadwiseError(f"the queue must hold at least 1 request, got {max_queue}")
        self.lm, self.compression, self.contexts, self.metrics = lm, compression, contexts, metrics
        self.contexts_dir = contexts_dir
        self.stop_ids = stop_token_ids(lm)
        lm.model.set_attn_implementation(headwise.attention.NAME)
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.worker = threading.Thread(target=self._work, name="headwise-worker", daemon=True)
        if contexts_dir is not None:
            self._load_saved(contexts_dir)

    # requests -------------------------------------------------------------------------------------------

    def check(self, prompt: Prompt, max_tokens: int) -> None:
        """Refuse a request that does not fit in the model's context."""
        total = prompt.tokens + max_tokens
        if total > self.lm.info.context_length:
            raise HeadwiseError(
                f"the prompt has {prompt.tokens} tokens and max_tokens is {max_tokens}, {total} in all, but "
                f"{self.lm.name}'s context is {self.lm.info.context_length} tokens"
            )

    def submit(self, job: Job) -> None:
        """Queue ``job``, or raise :class:`Busy` when the queue is full."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy from None

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        """Let the worker finish its current job and end."""
        self.queue.put(None)
        self.worker.join(timeout=30)

    # the worker -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            if job.cancelled.is_set():
                self.metrics.count(cancelled=1)
                continue
            try:
                self._serve(job)
            except HeadwiseError as exc:
                job.emit("error", 400, str(exc))
            except Exception as exc:  # a bug: report it to the client and keep serving
                log.exception("request failed")
                job.emit("error", 500, f"internal error: {type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def _serve(self, job: Job) -> None:
        cache, logits = self._begin(job.prompt)
        tok = self.lm.tokenizer
        tokens: list[int] = []
        sent = 0  # characters of the text already emitted
        finish = "length"
        first: float | None = None
        hold = max((len(s) for s in job.stop), default=1) - 1  # characters that may start a stop string

        def on_token(token: int) -> None:
            nonlocal sent, finish, first
            if first is None:
                first = time.perf_counter()
                self.metrics.count(ttft_sum=first - job.arrived, ttft_count=1)
            if job.cancelled.is_set():
                raise _Stop
            tokens.append(token)
            text = tok.decode(tokens, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                job.emit("text", text[sent:cut])
                sent, finish = cut, "stop"
                raise _Stop
            if token in self.stop_ids:
                finish = "stop"
            ready = len(text) if finish == "stop" or len(tokens) == job.max_tokens else len(text) - hold
            if text.endswith("\ufffd") and finish != "stop":  # an incomplete multi-byte character
                ready = min(ready, len(text) - 1)
            if ready > sent:
                job.emit("text", text[sent:ready])
                sent = ready

        try:
            decode(self.lm.model, logits, cache, max_new_tokens=job.max_tokens, sampling=job.sampling,
                   stop_ids=self.stop_ids, on_token=on_token)
        except _Stop:
            if job.cancelled.is_set():
                self.metrics.count(cancelled=1)
                return
        if first is not None:
            self.metrics.count(generated_tokens=len(tokens), decode_seconds=time.perf_counter() - first)
        usage = {"prompt_tokens": job.prompt.tokens, "completion_tokens": len(tokens),
                 "total_tokens": job.prompt.tokens + len(tokens)}
        job.emit("done", finish, usage)

    def _begin(self, prompt: Prompt) -> tuple[object, torch.Tensor]:
        """A cache holding the whole prompt and the logits after it: the context from the context cache (or
        compressed now), then the rest fed uncompressed to a copy of it."""
        if not prompt.context:
            cache = HeadwiseCache(self.lm.model.config, make_plan("full", select=self.compression.select))
            return cache, prefill(self.lm.model, torch.tensor([prompt.rest]), cache)
        context = self._context(prompt)
        cache = copy.deepcopy(context.cache)
        if not prompt.rest:
            return cache, context.logits[None]
        return cache, prefill(self.lm.model, torch.tensor([prompt.rest]), cache)

    def identity(self, plan) -> dict:
        """What a context's cache depends on besides its tokens: the model and every resolved plan option."""
        return {"model": self.lm.name, "plan": resolved_options(plan)}

    def _context(self, prompt: Prompt) -> Context:
        ids = prompt.context
        plan = self.compression.plan(prompt_length=len(ids))
        key = context_key(self.identity(plan), ids)
        context = self.contexts.get(key)
        if context is not None:
            self.metrics.count(context_hits=1)
            return context
        self.metrics.count(context_misses=1)
        if plan.needs_dense_prefill():  # KVzip, or budgets compared over every layer
            cache, logits = dense.prefill(self.lm.model, ids, plan, prompt.repeat)
        else:
            cache = HeadwiseCache(self.lm.model.config, plan)
            logits = prefill(self.lm.model, torch.tensor([ids]), cache)
        cache.seal()
        context = Context(key, cache, logits[0], len(ids))
        self.contexts.put(context)
        if self.contexts_dir is not None:
            save_context(context, self.contexts_dir, self.identity(plan))
        return context

    def _load_saved(self, folder: Path) -> None:
        """Put the contexts saved in ``folder`` by a server of the same model and plan into the context cache,
        the newest last (so the cap keeps the newest)."""
        if not folder.is_dir():
            return
        plan = self.compression.plan()
        for path in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            context = load_context(path, self.lm.model.config, plan, self.identity(plan))
            if context is not None:
                self.contexts.put(context)

    # what the server reports -----------------------------------------------------------------------------

    def gauges(self) -> dict[str, tuple[str, Callable[[], float]]]:
        return {
            "context_cache_bytes": ("Bytes held by the cached contexts (keys, values, last logits).",
                                    self.contexts.held_bytes),
            "context_cache_contexts": ("Contexts held by the context cache.", lambda: len(self.contexts)),
            "queue_depth": ("Requests waiting for the worker.", self.queue.qsize),
        }
