"""Benchmark runner: cell planning, the results store, both protocols on a tiny model, resume after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench_helpers import count_words, tiny_lm
from headwise.bench import runner, store, tasks
from headwise.errors import HeadwiseError

SMOLLM2 = Path.home() / ".cache" / "headwise" / "models" / "smollm2-135m"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def samples():
    return {
        (t, n): tasks.generate(t, n, 1, 0, count_words, tokenizer_name="words")
        for t in ("passkey", "kv")
        for n in (768,)
    }


def cells(methods=("streaming_llm",), ratios=(0.5,), protocols=("agnostic",)):
    return runner.plan_cells("tiny-llama", methods, ratios, ["passkey", "kv"], [768], protocols=protocols,
                             n_samples=1, seed=0)


def test_plan_cells_runs_full_once_per_task_and_length():
    planned = runner.plan_cells("m", ["full", "snapkv", "tova"], [0.0, 0.5, 0.75], ["passkey"], [1024, 2048],
                                protocols=["agnostic", "aware"], n_samples=2, seed=0)
    full = [c for c in planned if c.method == "full"]
    assert [(c.length, c.ratio) for c in full] == [(1024, 0.0), (2048, 0.0)]
    assert len(planned) == 2 * (1 + 2 * 2 * 2)
    assert len({c.key() for c in planned}) == len(planned)


def test_cell_key_is_stable_and_covers_options():
    cell = runner.Cell("m", "snapkv", 0.5, "passkey", 1024, "agnostic", 2, 0)
    assert cell.key() == runner.Cell("m", "snapkv", 0.5, "passkey", 1024, "agnostic", 2, 0).key()
    assert cell.key() != runner.Cell("m", "snapkv", 0.5, "passkey", 1024, "agnostic", 2, 0, {"window": "8"}).key()


@pytest.mark.parametrize(("kwargs", "match"), [({"protocols": ["psychic"]}, "protocol"), ({"ratios": [1.0]}, "ratio")])
def test_plan_cells_refuses_bad_input(kwargs, match):
    args = {"protocols": ["agnostic"], "ratios": [0.5], **kwargs}
    with pytest.raises(HeadwiseError, match=match):
        runner.plan_cells("m", ["snapkv"], args["ratios"], ["passkey"], [1024], protocols=args["protocols"],
                          n_samples=1, seed=0)


def test_store_survives_a_torn_line_and_keeps_the_last_record(tmp_path):
    path = tmp_path / "results.jsonl"
    base = {"library": "headwise", "model": "m", "method": "full", "ratio": 0.0, "task": "t", "length": 1,
            "protocol": "agnostic"}
    store.append_record(path, {**base, "key": "a", "score": 0.5})
    with open(path, "a") as fh:
        fh.write('{"key": "b", "sco')  # a crash in the middle of a write
    store.append_record(path, {**base, "key": "c", "score": 1.0})
    store.append_record(path, {**base, "key": "a", "score": 0.25})
    with pytest.warns(UserWarning, match="malformed"):
        records = store.read_records(path)
    assert [(r["key"], r["score"]) for r in records] == [("c", 1.0), ("a", 0.25)]


@pytest.mark.parametrize("protocol", runner.PROTOCOLS)
def test_sweep_on_tiny_model_writes_complete_records(tmp_path, lm, samples, protocol):
    path = tmp_path / "results.jsonl"
    records = runner.sweep(lm, cells(protocols=(protocol,)), lambda t, n: samples[(t, n)], path, progress=False)
    assert len(records) == 4
    for record in records:
        assert {"key", "library", "versions", "git_commit", "machine", "timestamp", "score", "kv_bytes",
                "peak_rss", "peak_rss_delta", "prefill_seconds", "decode_tokens_per_second"} <= set(record)
        assert record["library"] == "headwise" and record["kv_bytes"] > 0
        assert set(record["versions"]) == {"headwise", "torch", "transformers"}
    by_method = {(r["task"], r["method"]): r for r in records}
    assert by_method[("passkey", "streaming_llm")]["kv_bytes"] < by_method[("passkey", "full")]["kv_bytes"]
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == [r["key"] for r in records]


def test_interrupted_sweep_resumes_without_loss_or_duplicates(tmp_path, lm, samples, monkeypatch):
    path = tmp_path / "results.jsonl"
    planned = cells(methods=("streaming_llm", "knorm"))
    real_run_cell = runner.run_cell
    calls: list[str] = []

    def crash_after_three(lm, samples, cell):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(cell.key())
        return real_run_cell(lm, samples, cell)

    monkeypatch.setattr(runner, "run_cell", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        runner.sweep(lm, planned, lambda t, n: samples[(t, n)], path, progress=False)
    assert len(store.read_records(path)) == 3

    calls.clear()
    monkeypatch.setattr(runner, "run_cell", lambda lm, s, cell: calls.append(cell.key()) or real_run_cell(lm, s, cell))
    runner.sweep(lm, planned, lambda t, n: samples[(t, n)], path, progress=False)
    assert len(calls) == len(planned) - 3
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert sorted(keys) == sorted(c.key() for c in planned)


def test_sample_longer_than_the_model_context_is_refused(samples):
    short = tiny_lm(context_length=256)
    cell = runner.Cell("tiny-llama", "full", 0.0, "passkey", 768, "agnostic", 1, 0)
    with pytest.raises(HeadwiseError, match="context"):
        runner.run_sample(short, samples[("passkey", 768)][0], cell)


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists(), reason="SmolLM2 tokenizer not cached")
def test_chat_prompt_splits_after_the_context():
    from transformers import AutoTokenizer

    from headwise.models import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    lm = LoadedModel("smollm2-135m", None, tokenizer, None, instruct=True, load_seconds=0.0, from_cache=True)
    sample = tasks.generate("passkey", 512, 1, 0, tasks.token_counter(tokenizer), tokenizer_name="smollm2")[0]
    head, tail = runner.prompt_parts(lm, sample)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True)
    whole = whole if isinstance(whole, list) else whole["input_ids"]
    assert head + tail == list(whole)
    assert tokenizer.decode(head).endswith(sample.context[-40:])
    assert sample.question in tokenizer.decode(tail)


@pytest.mark.slow
def test_smollm2_one_cell_end_to_end(smollm2, tmp_path):
    sample = tasks.generate("passkey", 1024, 1, 0, tasks.token_counter(smollm2.tokenizer), tokenizer_name="smollm2")
    planned = runner.plan_cells(smollm2.name, ["streaming_llm"], [0.5], ["passkey"], [1024], n_samples=1, seed=0)
    records = runner.sweep(smollm2, planned, lambda t, n: sample, tmp_path / "r.jsonl", progress=False)
    full, compressed = records
    assert full["method"] == "full" and 0.4 < compressed["kv_bytes"] / full["kv_bytes"] < 0.6
    assert full["samples"][0]["output"]
