"""Benchmark runner: cell planning, the results store, both protocols on a tiny model, resume after a crash."""

from __future__ import annotations

import json
import warnings
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


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"options": {"tova": {"window": "8"}}}, "tova, which are not in the methods run"),
    ({"options": {"snapk": {"window": "8"}}}, "snapk, which are not in the methods run"),
    ({"options": {"full": {"window": "8"}}}, "'full' is the uncompressed baseline"),
    ({"methods": ["full", "snapkv"], "options": {"full": {"sinks": "2"}}}, "'full' is the uncompressed baseline"),
    ({"options": {"snapkv": {"windw": "8"}}}, "unknown option.*windw"),
    ({"options": {"snapkv": {"window": "wide"}}}, "expected a int"),
    ({"options": {"snapkv": {"window": "-3"}}}, "must be >= 0"),
    ({"options": {"snapkv": {"schedule": "foo"}}}, "unknown schedule"),
    ({"options": {"snapkv": {"slope": "-7", "schedule": "pyramid"}}}, "slope must be"),
    ({"options": {"snapkv": {"allocation": "greedy"}}}, "unknown allocation"),
    ({"chunk_size": 0}, "at least 1 token"),
    ({"chunk_size": -5}, "at least 1 token"),
])
def test_plan_cells_checks_every_method_option_and_the_chunk_size(kwargs, match):
    args = {"methods": ["snapkv"], "options": {}, "chunk_size": None, **kwargs}
    with pytest.raises(HeadwiseError, match=match):
        runner.plan_cells("m", args["methods"], [0.5], ["passkey"], [1024], n_samples=1, seed=0,
                          options=args["options"], chunk_size=args["chunk_size"])


def test_bench_refuses_options_for_a_method_it_does_not_run_before_loading(tmp_path, capsys, monkeypatch):
    import headwise.models
    from headwise.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # found by name, never loaded
    monkeypatch.setattr(headwise.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["bench", "--model", str(model), "--out", str(tmp_path / "out"), "--methods", "snapkv"]
    assert main([*argv, "-o", "tova:window=8"]) == 2
    assert "tova, which are not in the methods run (snapkv)" in capsys.readouterr().err
    assert main([*argv, "--chunk-size", "0"]) == 2
    assert "at least 1 token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_a_profile_made_for_another_model_before_any_cell(tmp_path, lm, samples):
    from conftest import tiny_model
    from test_headwise_policy import synthetic_profile

    other = tiny_model("qwen3")  # 3 layers x 6 heads; the tiny Llama has 2 x 4
    profile = synthetic_profile(other, tmp_path, [["mixed", "mixed"]] * 3, [[0.0, 0.0]] * 3)
    planned = runner.plan_cells("tiny-llama", ["headwise"], [0.5], ["passkey"], [768], n_samples=1, seed=0,
                                options={"headwise": {"profile": profile}})
    with pytest.raises(HeadwiseError, match="profile this model"):
        runner.sweep(lm, planned, lambda t, n: samples[(t, n)], tmp_path / "results.jsonl", progress=False)
    assert not (tmp_path / "results.jsonl").exists()  # not even the full-cache cell ran


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


RECORD = {"library": "headwise", "model": "m", "method": "full", "ratio": 0.0, "task": "t", "length": 1,
          "protocol": "agnostic", "score": 1.0}
TORN_IN_A_CHARACTER = b'{"key": "b", "output": "caf\xc3'  # a crash after the first byte of "\xe9"


def test_a_sweep_moves_torn_lines_out_of_the_store_once(tmp_path, lm):
    path = tmp_path / "results.jsonl"
    store.append_record(path, {**RECORD, "key": "a", "output": "line\u2028separator\x85next"})
    with open(path, "ab") as fh:
        fh.write(TORN_IN_A_CHARACTER)
    store.append_record(path, {**RECORD, "key": "c"})
    with open(path, "ab") as fh:
        fh.write(b'{"key": "d", "sco')  # torn last line
    with pytest.warns(UserWarning, match="moved 2 malformed line"):
        runner.sweep(lm, [], lambda t, n: [], path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the store is clean: no more warnings
        records = store.read_records(path)
    assert [r["key"] for r in records] == ["a", "c"] and records[0]["output"] == "line\u2028separator\x85next"
    side = tmp_path / "results.jsonl.torn"
    assert side.read_bytes() == TORN_IN_A_CHARACTER + b'\n{"key": "d", "sco\n'
    assert store.repair(path) == 0 and side.read_bytes().count(b"\n") == 2  # once only


def test_repair_leaves_a_clean_store_untouched(tmp_path):
    path = tmp_path / "results.jsonl"
    assert store.repair(path) == 0 and not path.exists()
    store.append_record(path, {**RECORD, "key": "a"})
    before = path.stat()
    assert store.repair(path) == 0
    assert path.stat().st_ino == before.st_ino and not (tmp_path / "results.jsonl.torn").exists()


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
