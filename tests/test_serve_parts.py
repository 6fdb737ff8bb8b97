"""The server's parts without a server: prompt splitting, the context cache, saving contexts, the metrics text."""

from __future__ import annotations

import copy

import pytest
import torch

from bench_helpers import tiny_lm
from conftest import tiny_model
from headwise import dense
from headwise.api import make_cache, make_plan
from headwise.cache import HeadwiseCache
from headwise.compat import forward
from headwise.errors import HeadwiseError
from headwise.generation import prefill
from headwise.policies.kvzip import REPEAT
from headwise.serve.cli import parse_bytes
from headwise.serve.contexts import Context, ContextCache, context_key, load_context, save_context
from headwise.serve.launch import parse_metrics
from headwise.serve.metrics import Metrics
from headwise.serve.prompts import chat_prompt, completion_prompt
from serve_helpers import byte_tokenizer


@pytest.fixture
def chat_lm():
    lm = tiny_lm()
    lm.tokenizer, lm.instruct = byte_tokenizer(), True
    return lm


def test_chat_prompt_cuts_after_the_system_message(chat_lm):
    doc, question = "a long document " * 8, "what is in it?"
    messages = [{"role": "system", "content": doc}, {"role": "user", "content": question}]
    prompt = chat_prompt(chat_lm, messages, threshold=16)
    tok = chat_lm.tokenizer
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(prompt.context) + tok.decode(prompt.rest) == rendered
    assert tok.decode(prompt.context).endswith(doc)
    assert tok.decode(prompt.rest).startswith("<|im_end|>")
    other = chat_prompt(chat_lm, [messages[0], {"role": "user", "content": "and else?"}], threshold=16)
    assert other.context == prompt.context  # the same context, whatever the question


def test_a_prompts_reconstruction_request_keeps_the_templates_roles(chat_lm):
    tok, doc = chat_lm.tokenizer, "a long document " * 8
    system = chat_prompt(chat_lm, [{"role": "system", "content": doc}, {"role": "user", "content": "q?"}], 16)
    request, text = system.repeat
    assert tok.decode(text) == doc
    assert tok.decode(request) == f"<|im_end|>\n<|im_start|>user\n{REPEAT}<|im_end|>\n<|im_start|>assistant\n"
    user = chat_prompt(chat_lm, [{"role": "user", "content": doc}], 16)
    assert tok.decode(user.repeat[0]) == f"\n\n{REPEAT}<|im_end|>\n<|im_start|>assistant\n"
    completion = completion_prompt(chat_lm, "first part\n\nQ: why?", threshold=4)
    assert [tok.decode(ids) for ids in completion.repeat] == [f"{REPEAT}\n\n", "first part\n\n"]
    assert chat_prompt(chat_lm, [{"role": "user", "content": "short"}], 16).repeat is None


def test_a_dense_prefill_plan_keeps_its_budget_over_the_whole_model():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (40,)).tolist()
    plan = make_plan("kvzip", ratio=0.5)
    with pytest.raises(HeadwiseError, match="reconstruction"):
        dense.prefill(model, ids, plan)
    cache, logits = dense.prefill(model, ids, plan, (ids[:3], ids))
    kept = [n for layer in cache.compressed_layers for n in layer.kept()]
    assert sum(kept) == len(kept) * 20 and len(set(kept)) > 1  # half in all, split unevenly over the heads
    full = make_cache(model, "full")
    assert torch.allclose(logits, prefill(model, torch.tensor([ids]), full), atol=1e-5)


def test_chat_prompt_takes_the_first_user_message_only_when_long(chat_lm):
    long = chat_prompt(chat_lm, [{"role": "user", "content": "x" * 40}], threshold=32)
    assert chat_lm.tokenizer.decode(long.context).endswith("x" * 40)
    short = chat_prompt(chat_lm, [{"role": "user", "content": "x" * 10}], threshold=32)
    assert short.context == [] and short.tokens == long.tokens - 30


def test_chat_prompt_needs_a_template():
    with pytest.raises(HeadwiseError, match="no chat template"):
        chat_prompt(tiny_lm(), [{"role": "user", "content": "hi"}], threshold=1)


def test_completion_prompt_cuts_at_the_last_blank_line(chat_lm):
    tok = chat_lm.tokenizer
    prompt = completion_prompt(chat_lm, "first part\n\nsecond part\n\nQ: why?", threshold=4)
    assert tok.decode(prompt.context) == "first part\n\nsecond part\n\n"
    assert tok.decode(prompt.rest) == "Q: why?"
    ends = completion_prompt(chat_lm, "all of it is context\n\n", threshold=4)
    assert ends.rest == [] and tok.decode(ends.context) == "all of it is context\n\n"
    assert completion_prompt(chat_lm, "short\n\nQ", threshold=100).context == []


def _context(model, key: str, n: int, policy="snapkv", ratio=0.5) -> Context:
    cache = make_cache(model, policy, ratio=ratio)
    torch.manual_seed(n)
    logits = prefill(model, torch.randint(0, 128, (1, n)), cache)
    cache.seal()
    return Context(key, cache, logits[0], n)


def test_context_cache_drops_the_least_recently_used_past_its_cap():
    model = tiny_model("llama")
    a, b, c = (_context(model, k, 64) for k in "abc")
    cache = ContextCache(cap_bytes=2 * a.nbytes)
    assert cache.put(a) == [] and cache.put(b) == []
    assert cache.get("a") is a  # now b is the least recently used
    assert cache.put(c) == ["b"]
    assert set(cache.entries) == {"a", "c"} and cache.held_bytes() == a.nbytes + c.nbytes <= cache.cap_bytes
    assert ContextCache(cap_bytes=a.nbytes - 1).put(a) == ["a"]  # larger than the cap: not kept
    with pytest.raises(HeadwiseError):
        ContextCache(-1)


def test_context_key_depends_on_tokens_and_identity():
    one = {"model": "m", "plan": {"ratio": 0.5}}
    assert context_key(one, [1, 2]) == context_key(dict(one), [1, 2])
    assert context_key(one, [1, 2]) != context_key(one, [1, 3])
    assert context_key(one, [1, 2]) != context_key({"model": "m", "plan": {"ratio": 0.75}}, [1, 2])


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("policy", ["snapkv", "full"])
def test_saved_context_answers_exactly_as_the_original(tmp_path, arch, policy):
    model = tiny_model(arch)
    ratio = 0.5 if policy == "snapkv" else None
    context = _context(model, "k", 80, policy, ratio)  # longer than gemma3's sliding window of 16
    identity = {"model": arch, "plan": policy}
    path = save_context(context, tmp_path, identity)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    plan = make_plan(policy, ratio=ratio)
    loaded = load_context(path, model.config, plan, identity)
    assert loaded is not None and loaded.tokens == 80 and torch.equal(loaded.logits, context.logits)
    assert loaded.cache.kept() == context.cache.kept()
    assert loaded.cache.get_seq_length() == context.cache.get_seq_length() == 80
    question = torch.randint(0, 128, (1, 7))
    outputs = [forward(model, copy.deepcopy(c.cache), question).logits for c in (context, loaded)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert load_context(path, model.config, plan, {"model": "other", "plan": policy}) is None


def test_a_broken_saved_context_is_a_headwise_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(HeadwiseError, match="cannot read the saved context"):
        load_context(path, tiny_model("llama").config, make_plan("full"), {})


def test_from_tensors_of_an_empty_cache_is_empty():
    model = tiny_model("llama")
    cache = HeadwiseCache.from_tensors(model.config, make_plan("full"), {})
    assert cache.get_seq_length() == 0


def test_metrics_text_is_prometheus_exposition():
    metrics = Metrics()
    metrics.request("chat")
    metrics.request("chat")
    metrics.error(400)
    metrics.count(context_hits=3, ttft_sum=0.5, ttft_count=2, generated_tokens=10, decode_seconds=2.0)
    text = metrics.render({"queue_depth": ("Waiting requests.", lambda: 4)})
    lines = text.splitlines()
    assert 'headwise_requests_total{endpoint="chat"} 2.0' in lines
    assert 'headwise_errors_total{status="400"} 1.0' in lines
    assert "headwise_context_cache_hits_total 3.0" in lines
    assert "headwise_time_to_first_token_seconds_sum 0.5" in lines
    assert "headwise_time_to_first_token_seconds_count 2.0" in lines
    assert "headwise_decode_tokens_per_second 5.0" in lines
    assert "headwise_queue_depth 4.0" in lines
    assert "# TYPE headwise_time_to_first_token_seconds summary" in lines
    parsed = parse_metrics(text)
    assert parsed['headwise_requests_total{endpoint="chat"}'] == 2 and parsed["headwise_queue_depth"] == 4
    assert len(parsed) == sum(1 for line in lines if not line.startswith("#"))


@pytest.mark.parametrize(("text", "expected"), [("2GiB", 2**31), ("512MiB", 2**29), ("1000", 1000), ("1.5kb", 1500)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2 parsecs", "-1"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(HeadwiseError, match="cannot read"):
        parse_bytes(text)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--policy", "snapkv", "--ratio", "1.5"], "ratio"),
    (["--policy", "nope"], "unknown policy"),
    (["--cache-bytes", "lots"], "--cache-bytes"),
    (["--context-threshold", "0"], "--context-threshold"),
    (["--port", "70000"], "--port must be in"),
    (["--served-name", " "], "--served-name"),
    (["--max-queue", "0"], "queue"),
    (["--select", "quest"], "exactly one of a budget"),
])
def test_serve_refuses_bad_arguments_in_one_line(capsys, args, fragment):
    from headwise.cli import main

    assert main(["serve", "--model", "no-such-model", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headwise: error:") and fragment in err and "\n" not in err


def test_a_served_plan_carries_its_selection_rule():
    from headwise.select import Quest
    from headwise.serve.engine import Compression

    plan = Compression("snapkv", 0.5, select="quest:budget=128").plan(prompt_length=1000)
    assert plan.select == Quest(budget=128) and plan.ratio == 0.5


def test_serve_refuses_a_contexts_dir_that_is_a_file(capsys, tmp_path):
    from headwise.cli import main

    path = tmp_path / "file"
    path.write_text("x")
    assert main(["serve", "--model", "no-such-model", "--contexts-dir", str(path)]) == 2
    assert "is a file" in capsys.readouterr().err
