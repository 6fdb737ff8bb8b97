"""The HTTP side of the server: OpenAI-shaped endpoints on FastAPI, in front of the :class:`~.engine.Engine`.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text). Requests are
checked here, before they are queued: bad JSON, an unknown model, unknown or unsupported fields, bad sampling
values and prompts longer than the context get an OpenAI-shaped error (``{"error": {"message", "type",
"param", "code"}}``) with status 400, 404 or 429, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from headwise.errors import HeadwiseError
from headwise.generation import Sampling
from headwise.serve.engine import Busy, Engine, Job
from headwise.serve.prompts import Prompt, chat_prompt, completion_prompt

DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant")
#: Fields each endpoint accepts; any other is refused rather than ignored.
COMMON = {"model", "max_tokens", "temperature", "top_p", "stream", "stop", "seed", "n", "user", "stream_options"}
FIELDS = {"chat": COMMON | {"messages", "max_completion_tokens"}, "completions": COMMON | {"prompt"}}


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the offending field and an OpenAI error code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    if status >= 500:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Parsed:
    """A checked request."""

    prompt: Prompt
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(400, f"{name} must be a number", name)
    if value < low or value > high or (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise RequestError(400, f"{name} must be in {bound}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name} must be an integer", name)
    if value < low:
        raise RequestError(400, f"{name} must be at least {low}, got {value}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return tuple(stops)


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}] needs a role ({', '.join(ROLES)}) and a string content",
                               "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError(400, f"messages[{i}] has unsupported fields: {', '.join(sorted(extra))}", "messages")
        checked.append({"role": m["role"], "content": m["content"]})
    return checked


class Server:
    """The FastAPI app of one engine (:attr:`app`), serving the model under the name ``model_name``."""

    def __init__(self, engine: Engine, model_name: str, threshold: int) -> None:
        self.engine, self.model_name, self.threshold = engine, model_name, threshold
        self.created = int(time.time())
        self.app = FastAPI(title="headwise", docs_url=None, redoc_url=None, openapi_url=None)
        self.app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        self.app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        self.app.add_api_route("/v1/models", self.models, methods=["GET"])
        self.app.add_api_route("/health", self.health, methods=["GET"])
        self.app.add_api_route("/metrics", self.metrics, methods=["GET"])

    # endpoints -------------------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completions")

    async def models(self) -> dict:
        return {"object": "list",
                "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "headwise"}]}

    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_name, "worker_alive": self.engine.worker.is_alive()}

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.engine.metrics.render(self.engine.gauges()),
                                 media_type="text/plain; version=0.0.4")

    # the work --------------------------------------------------------------------------------------------

    def _fail(self, status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        self.engine.metrics.error(status)
        return JSONResponse(error_body(status, message, param, code), status_code=status)

    def _parse(self, body: Any, endpoint: str) -> Parsed:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        unknown = set(body) - FIELDS[endpoint]
        if unknown:
            raise RequestError(400, f"unsupported fields: {', '.join(sorted(unknown))}", sorted(unknown)[0])
        if body.get("model") != self.model_name:
            raise RequestError(404, f"the model '{body.get('model')}' does not exist; this server serves "
                                    f"'{self.model_name}'", "model", "model_not_found")
        if _integer(body, "n", 1, 1) != 1:
            raise RequestError(400, "n must be 1", "n")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, name, DEFAULT_MAX_TOKENS, 1)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default; 0 is greedy
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, open_low=True)
        seed = _integer(body, "seed", 0, 0)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "stream must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(400, "stream_options takes only include_usage", "stream_options")
        try:
            if endpoint == "chat":
                prompt = chat_prompt(self.engine.lm, _messages(body), self.threshold)
            else:
                text = body.get("prompt")
                if not isinstance(text, str) or not text:
                    raise RequestError(400, "prompt must be a non-empty string", "prompt")
                prompt = completion_prompt(self.engine.lm, text, self.threshold)
            self.engine.check(prompt, max_tokens)
        except HeadwiseError as exc:
            code = "context_length_exceeded" if "context is" in str(exc) else None
            raise RequestError(400, str(exc), "messages" if endpoint == "chat" else "prompt", code) from exc
        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
        return Parsed(prompt, max_tokens, sampling, _stop(body), stream, bool(options.get("include_usage")))

    async def _complete(self, request: Request, endpoint: str) -> Response:
        self.engine.metrics.request(endpoint)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return self._fail(400, f"the request body is not valid JSON: {exc}")
        try:
            parsed = self._parse(body, endpoint)
        except RequestError as exc:
            return self._fail(exc.status, str(exc), exc.param, exc.code)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(*event: Any) -> None:  # from the worker thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(parsed.prompt, parsed.max_tokens, parsed.sampling, parsed.stop, emit)
        try:
            self.engine.submit(job)
        except Busy:
            return self._fail(429, "the server's queue is full; retry later", code="queue_full")
        shape = Shape(endpoint, self.model_name)
        if parsed.stream:
            return StreamingResponse(self._stream(job, events, shape, parsed.include_usage),
                                     media_type="text/event-stream")
        pieces: list[str] = []
        try:
            while (event := await events.get())[0] == "text":
                pieces.append(event[1])
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if event[0] == "error":
            return self._fail(event[1], event[2])
        return JSONResponse(shape.whole("".join(pieces), event[1], event[2]))

    async def _stream(self, job: Job, events: asyncio.Queue, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
        try:
            if shape.endpoint == "chat":
                yield _sse(shape.chunk(role=True))
            while (event := await events.get())[0] == "text":
                if event[1]:
                    yield _sse(shape.chunk(text=event[1]))
            if event[0] == "error":
                self.engine.metrics.error(event[1])
                yield _sse(error_body(event[1], event[2]))
            else:
                yield _sse(shape.chunk(finish=event[1]))
                if include_usage:
                    yield _sse({**shape.chunk(), "choices": [], "usage": event[2]})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the generator is closed): stop the job either way
            job.cancelled.set()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


@dataclass
class Shape:
    """The OpenAI response objects of one request."""

    endpoint: str
    model: str

    def __post_init__(self) -> None:
        chat = self.endpoint == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, *, text: str = "", role: bool = False, finish: str | None = None) -> dict:
        if self.endpoint == "chat":
            delta = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}
