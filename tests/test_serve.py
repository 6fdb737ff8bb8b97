"""A real ``headwise serve`` process on loopback, driven by the official ``openai`` client.

The model is a tiny random Llama with a byte tokenizer (:mod:`serve_helpers`), so its text is noise, but
greedy answers are deterministic: the same request must give the same answer from a cache miss, a cache
hit, a stream, another client at the same time, and a server restarted on its saved contexts.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from headwise.serve.launch import ServerProcess
from serve_helpers import tiny_chat_folder

DOC = "The door code is 4521. The gate code is 9034. " * 12  # about 560 byte tokens: a context
MODEL = "tiny"


class Served(ServerProcess):
    """The tiny model's server (snapkv at 0.5, contexts from 64 tokens), with an ``openai`` client and raw posts."""

    def __init__(self, folder: Path, *args: str) -> None:
        super().__init__(["--model", str(folder), "--served-name", MODEL, "--policy", "snapkv", "--ratio", "0.5",
                          "--context-threshold", "64", *args], timeout=120)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def post(self, path: str, body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_chat_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def contexts_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contexts")


@pytest.fixture(scope="module")
def server(folder, contexts_dir):
    served = Served(folder, "--max-queue", "4", "--contexts-dir", str(contexts_dir))
    yield served
    served.close()


def ask(server: Served, question: str, **kwargs) -> str:
    reply = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": DOC}, {"role": "user", "content": question}],
        max_tokens=12, temperature=0, **kwargs)
    return reply.choices[0].message.content


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list()] == [MODEL]


def test_a_context_is_compressed_once_and_answers_every_question(server):
    misses, hits = server.metric("context_cache_misses_total"), server.metric("context_cache_hits_total")
    first = ask(server, "What is the door code?")
    assert server.metric("context_cache_misses_total") == misses + 1
    assert ask(server, "What is the door code?") == first  # from a copy: the cached context is unchanged
    ask(server, "What is the gate code?")
    assert server.metric("context_cache_hits_total") == hits + 2
    assert server.metric("context_cache_contexts") >= 1 and server.metric("context_cache_bytes") > 0


def test_a_stream_says_what_the_whole_answer_says(server):
    whole = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0)
    chunks = list(server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_with_and_without_a_rest(server):
    for prompt in (DOC + "\n\nQ: the door code?", DOC + "\n\n"):
        reply = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
        streamed = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                                    stream=True)
        assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text
        assert reply.usage.completion_tokens == 5 or reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("change", "status", "fragment"), [
    ({"model": "gpt-9"}, 404, "does not exist"),
    ({"max_tokens": -1}, 400, "max_tokens must be at least 1"),
    ({"temperature": 5}, 400, "temperature must be in"),
    ({"top_p": 0}, 400, "top_p must be in"),
    ({"max_tokens": 5000}, 400, "context is 1024 tokens"),
    ({"extra_body": {"logit_bias": {}}}, 400, "unsupported fields: logit_bias"),
])
def test_bad_requests_get_openai_errors(server, change, status, fragment):
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(openai.APIStatusError) as caught:
        server.client.chat.completions.create(**kwargs)
    assert caught.value.status_code == status and fragment in caught.value.message
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_malformed_json_and_a_long_prompt(server):
    status, body = server.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = server.post("/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "x" * 2000, "max_tokens": 1}).encode())
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert ask(server, "still there?")  # nothing broke


def test_concurrent_clients_get_the_answers_they_would_get_alone(server):
    alone = {q: ask(server, q) for q in ("one?", "two?")}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: (q, ask(server, q)), ["one?", "two?"] * 2))
    assert all(a == alone[q] for q, a in answers)


def test_a_full_queue_answers_429_and_recovers(server):
    def long_request(_: int) -> int:
        try:
            server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                  max_tokens=600, temperature=0)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(10) as pool:  # one served, four waiting, the rest refused
        statuses = list(pool.map(long_request, range(10)))
    assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    assert server.metric("errors_total") >= statuses.count(429)
    assert ask(server, "after the rush?")


def test_a_client_that_goes_away_frees_its_slot(server):
    cancelled = server.metric("cancelled_total")
    stream = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "talk"}],
                                                   max_tokens=900, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while server.metric("cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("cancelled_total") == cancelled + 1
    assert ask(server, "next?")


def test_a_restarted_server_loads_its_saved_contexts(server, folder, contexts_dir):
    before = ask(server, "What is the door code?")
    assert list(contexts_dir.glob("*.safetensors"))
    again = Served(folder, "--contexts-dir", str(contexts_dir))
    try:
        assert ask(again, "What is the door code?") == before
        assert again.metric("context_cache_hits_total") == 1 and again.metric("context_cache_misses_total") == 0
    finally:
        again.close()


def test_a_kvzip_server_compresses_a_context_once_by_its_reconstruction(folder):
    kvzip = Served(folder, "--policy", "kvzip")  # the later --policy wins: kvzip at ratio 0.5
    try:
        first = ask(kvzip, "What is the door code?")
        assert ask(kvzip, "What is the door code?") == first
        assert kvzip.metric("context_cache_misses_total") == 1 and kvzip.metric("context_cache_hits_total") == 1
    finally:
        kvzip.close()
