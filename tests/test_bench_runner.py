"""Benchmark runner: cell planning and keys, the calibration gate, the results store, parts per context on a tiny
model (shared dense prefill, fidelity, both protocols), resume after a crash, versions never mixed silently."""

from __future__ import annotations

import dataclasses
import gzip
import json
import warnings
from pathlib import Path

import pytest

from bench_helpers import count_words, tiny_lm
from headwise.bench import calibration, protocol, runner, store, tasks
from headwise.errors import HeadwiseError

SMOLLM2 = Path.home() / ".cache" / "headwise" / "models" / "smollm2-135m"
TASKS = ("passkey", "multikey")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def samples():
    """Two contexts per task at 768 words, for the reported seed 0 and the calibration seed."""
    return {
        (t, 768, seed): tasks.generate(t, 768, 2, seed, count_words, tokenizer_name="words")
        for t in TASKS
        for seed in (0, calibration.CALIBRATION_SEED)
    }


def cells(methods=("streaming_llm",), ratios=(0.5,), protocols=("agnostic",), **kw):
    return runner.plan_cells("tiny-llama", methods, ratios, list(TASKS), [768], protocols=protocols, n_samples=2,
                             seed=0, **kw)


def run(lm, planned, samples, path, **kw):
    return runner.sweep(lm, planned, lambda t, n, seed: samples[(t, n, seed)], path, progress=False, **kw)


# ---------------------------------------------------------------------------------------------- planning


def test_plan_cells_runs_the_gate_first_then_full_once_per_task_and_length():
    planned = runner.plan_cells("m", ["full", "snapkv", "tova"], [0.0, 0.5, 0.75], ["passkey"], [1024, 2048],
                                protocols=["agnostic", "aware"], n_samples=2, seed=0, calibration_samples=3)
    gate = [c for c in planned if c.calibration]
    assert planned[: len(gate)] == gate
    assert [(c.method, c.length, c.seed, c.n_samples) for c in gate] == [("full", 1024, 100, 3), ("full", 2048, 100, 3)]
    reported = [c for c in planned if not c.calibration]
    assert [(c.length, c.ratio) for c in reported if c.method == "full"] == [(1024, 0.0), (2048, 0.0)]
    assert len(reported) == 2 * (1 + 2 * 2 * 2) and {c.seed for c in reported} == {0}
    assert len({c.key() for c in planned}) == len(planned)


def test_the_calibration_seed_is_never_reported():
    with pytest.raises(HeadwiseError, match="calibration seed"):
        runner.plan_cells("m", ["snapkv"], [0.5], ["passkey"], [1024], n_samples=1, seed=100)
    assert not any(c.calibration for c in runner.plan_cells("m", ["snapkv"], [0.5], ["passkey"], [1024], n_samples=1,
                                                             seed=100, calibration_seed=None))


def test_cell_key_hashes_resolved_options_not_options_as_typed():
    def key(options):
        (cell,) = [c for c in runner.plan_cells("m", ["snapkv"], [0.5], ["passkey"], [1024], n_samples=1, seed=0,
                                                options={"snapkv": options}, calibration_seed=None)
                   if c.method == "snapkv"]
        return cell.key()

    default_window = runner.resolved_options(runner.make_plan("snapkv", ratio=0.5))["window"]
    assert key({}) == key({"window": str(default_window)})  # a default typed out is the same cell
    assert key({}) != key({"window": str(default_window + 1)})
    cell = runner.Cell("m", "snapkv", 0.5, "passkey", 1024, "agnostic", 2, 0, fingerprint="a")
    assert cell.key() != dataclasses.replace(cell, fingerprint="b").key()
    assert cell.part_key("c0", "d") != cell.part_key("c1", "d") != cell.part_key("c1", "e")


def test_resolved_options_follow_the_content_of_a_profile(tmp_path):
    from conftest import tiny_model
    from test_headwise_policy import synthetic_profile

    model = tiny_model("llama")
    path = synthetic_profile(model, tmp_path, [["mixed", "mixed"]] * 3, [[0.0, 0.0]] * 3)
    before = runner.resolved_options(runner.make_plan("headwise", ratio=0.5, options={"profile": path}))
    data = json.loads(Path(path).read_text())
    data["model"] = data.get("model", "") + " (edited)"
    Path(path).write_text(json.dumps(data))
    after = runner.resolved_options(runner.make_plan("headwise", ratio=0.5, options={"profile": path}))
    assert before["profile"] == after["profile"] and before["profile_sha256"] != after["profile_sha256"]


def test_code_digest_ignores_docstrings_and_comments_but_not_code(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('def f(x):\n    """Doc."""\n    return x + 1\n')
    base = runner.code_digest([path])
    path.write_text('def f(x):\n    """Another doc."""\n    # a comment\n    return x + 1\n')
    assert runner.code_digest([path]) == base
    path.write_text('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert runner.code_digest([path]) != base


def test_the_fingerprint_covers_the_methods_but_not_the_report():
    files = {p.relative_to(Path(runner.headwise.__file__).parent).as_posix()
             for p in runner.fingerprinted_files(Path(runner.headwise.__file__).parent)}
    assert {"cache.py", "dense.py", "policies/snapkv.py", "bench/protocol.py", "bench/tasks.py"} <= files
    assert not {"report/bench_report.py", "bench/cli.py", "bench/store.py"} & files


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
    assert main([*argv, "--seed", "100"]) == 2
    assert "calibration seed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_refuses_a_profile_made_for_another_model_before_any_part(tmp_path, lm, samples):
    from conftest import tiny_model
    from test_headwise_policy import synthetic_profile

    other = tiny_model("qwen3")  # 3 layers x 6 heads; the tiny Llama has 2 x 4
    profile = synthetic_profile(other, tmp_path, [["mixed", "mixed"]] * 3, [[0.0, 0.0]] * 3)
    planned = runner.plan_cells("tiny-llama", ["headwise"], [0.5], ["passkey"], [768], n_samples=2, seed=0,
                                options={"headwise": {"profile": profile}})
    with pytest.raises(HeadwiseError, match="profile this model"):
        run(lm, planned, samples, tmp_path / "results.jsonl")
    assert not (tmp_path / "results.jsonl").exists()  # not even the full-cache part ran


# ---------------------------------------------------------------------------------------------- the store


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
        run(lm, [], {}, path, allow_mixed=True)  # the records here carry no fingerprint
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


def test_a_packed_store_is_read_and_restored_when_the_store_is_absent(tmp_path):
    path = tmp_path / "results.jsonl"
    store.append_record(path, {**RECORD, "key": "a"})
    store.pack(path)
    packed = store.packed(path).read_bytes()
    store.pack(path)
    assert store.packed(path).read_bytes() == packed  # reproducible bytes
    assert gzip.decompress(packed) == path.read_bytes()
    assert [r["key"] for r in store.read_records(store.packed(path))] == ["a"]  # named directly (--include)
    path.unlink()
    assert [r["key"] for r in store.read_records(path)] == ["a"]
    store.unpack(path)
    assert [r["key"] for r in store.read_records(path)] == ["a"] and path.exists()


def test_a_store_of_other_code_or_versions_is_refused_unless_asked(tmp_path, lm, samples):
    path = tmp_path / "results.jsonl"
    store.append_record(path, {**RECORD, "key": "old", "fingerprint": "0123456789abcdef"})
    planned = cells(ratios=())
    with pytest.raises(HeadwiseError, match=r"fingerprint 0123456789abcdef.*--allow-mixed-versions"):
        run(lm, planned, samples, path)
    assert len(store.read_records(path)) == 1
    records = run(lm, planned, samples, path, allow_mixed=True)
    assert records and {r["fingerprint"] for r in records} == {runner.fingerprint()}


# ---------------------------------------------------------------------------------------------- parts


@pytest.mark.parametrize("protocol", runner.PROTOCOLS)
def test_sweep_writes_one_part_per_cell_and_context_with_fidelity(tmp_path, lm, samples, protocol):
    path = tmp_path / "results.jsonl"
    planned = cells(protocols=(protocol,))
    records = run(lm, planned, samples, path)
    contexts_per_task = 2
    assert len(records) == len(planned) * contexts_per_task
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == [r["key"] for r in records]
    for record in records:
        assert {"key", "cell", "context_id", "library", "versions", "git_commit", "machine", "timestamp", "score",
                "kv_bytes", "peak_rss", "peak_rss_delta", "prefill_seconds", "compress_seconds", "fingerprint",
                "resolved", "calibration", "shared_prefill", "samples"} <= set(record)
        questions = [s for s in samples[(record["task"], 768, record["seed"])]
                     if s.context_id == record["context_id"]]
        assert [row["id"] for row in record["samples"]] == [s.id for s in questions] and len(questions) > 1
        assert record["score"] == pytest.approx(sum(r["score"] for r in record["samples"]) / len(questions))
        assert record["shared_prefill"] == (record["protocol"] == "agnostic")  # full is always agnostic
        for row in record["samples"]:
            assert 0 <= row["top1"] <= 1 and row["nll"] >= 0 and row["answer_ids"]
            if record["method"] == "full":
                assert row["nll"] == pytest.approx(row["nll_full"])
            assert ("needle_kept" in row) == (record["method"] != "full")
            if "needle_kept" in row:  # the needle: the answer's word, where the context holds it
                kept = row["needle_kept"]
                assert sorted(kept) == ["0", "1"] and all(len(v) == 2 for v in kept.values())
                assert all(0 <= share <= 1 for v in row["needle_kept"].values() for share in v)
    by = {(r["task"], r["context_id"], r["method"], r["calibration"]): r for r in records}
    for (task, context_id, method, calibrated), record in by.items():
        if method != "full":
            assert record["kv_bytes"] < by[(task, context_id, "full", calibrated)]["kv_bytes"]
    assert {r["seed"] for r in records if r["calibration"]} == {calibration.CALIBRATION_SEED}
    assert set(calibration.gate(records)) == {("tiny-llama", t, 768) for t in TASKS}


def test_a_sweep_runs_kvzip_from_the_shared_prefill(tmp_path, lm, samples):
    records = run(lm, cells(methods=("kvzip",), calibration_seed=None), samples, tmp_path / "results.jsonl")
    by = {(r["context_id"], r["method"]): r for r in records}
    kvzip = [r for r in records if r["method"] == "kvzip"]
    assert len(kvzip) == 2 * len(TASKS) and all(r["shared_prefill"] for r in kvzip)
    assert all(r["kv_bytes"] < by[(r["context_id"], "full")]["kv_bytes"] for r in kvzip)


def test_the_shared_prefill_gives_the_answers_of_the_direct_path(tmp_path, lm, samples):
    questions = runner.contexts(samples[("passkey", 768, 0)])[0]
    ctx = runner.Context(lm, questions)
    cell = next(c for c in cells(methods=("snapkv",), calibration_seed=None) if c.method == "snapkv")
    assert cell.shares_prefill
    shared, _, _ = ctx.compressed(cell, ctx.head)
    direct_cache = runner.new_cache(lm, cell, len(ctx.head))
    runner.prefill(lm.model, runner.torch.tensor([ctx.head]), direct_cache)
    direct_cache.seal()
    for sample, tail in zip(questions, ctx.tails, strict=True):
        a, b = protocol.answer(lm, shared, tail, sample), protocol.answer(lm, direct_cache, tail, sample)
        assert a.tokens == b.tokens
        assert protocol.follow(lm, shared, tail, a.tokens) == protocol.follow(lm, direct_cache, tail, a.tokens)
    assert runner.cache_bytes(shared) == runner.cache_bytes(direct_cache)


def test_a_part_run_on_other_task_content_is_not_reused(tmp_path, lm, samples):
    path = tmp_path / "results.jsonl"
    planned = cells()
    first = run(lm, planned, samples, path)
    assert run(lm, planned, samples, path) == []  # the same contents: nothing to run
    moved = {g: [dataclasses.replace(q, depth=0.3) for q in qs] for g, qs in samples.items()}  # same context ids
    again = run(lm, planned, moved, path)
    assert len(again) == len(first) and {r["key"] for r in again}.isdisjoint(r["key"] for r in first)


def test_a_sweep_over_a_committed_copy_only_adds_to_its_records(tmp_path, lm, samples):
    """A clean clone holds a store as its packed copy only; a sweep that extends it restores the store first, so the
    copy packed afterwards holds the old parts and the new ones (not the new ones alone)."""
    path = tmp_path / "results.jsonl"
    first = run(lm, cells(methods=("streaming_llm",)), samples, path)
    store.pack(path)
    path.unlink()
    more = run(lm, cells(methods=("streaming_llm", "knorm")), samples, path)
    assert more and {r["method"] for r in more} == {"knorm"}  # the committed parts were not run again
    store.pack(path)
    path.unlink()
    kept = {r["key"] for r in store.read_records(path)}
    assert kept == {r["key"] for r in first + more}


def test_interrupted_sweep_resumes_without_loss_or_duplicates(tmp_path, lm, samples, monkeypatch):
    path = tmp_path / "results.jsonl"
    planned = cells(methods=("streaming_llm", "knorm"))
    real_run_part = runner.run_part
    calls: list[str] = []

    def crash_after_three(ctx, cell, references):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(cell.part_key(ctx.id, ctx.digest))
        return real_run_part(ctx, cell, references)

    monkeypatch.setattr(runner, "run_part", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(lm, planned, samples, path)
    assert len(store.read_records(path)) == 3

    calls.clear()
    monkeypatch.setattr(runner, "run_part", lambda ctx, cell, refs: calls.append(cell.part_key(ctx.id, ctx.digest))
                        or real_run_part(ctx, cell, refs))
    run(lm, planned, samples, path)
    parts = len(planned) * 2
    assert len(calls) == parts - 3
    records = store.read_records(path)
    assert len(records) == parts == len({r["key"] for r in records})
    # a compressed part run after the resume still found its context's reference answers in the store
    assert all(row["nll_full"] >= 0 for r in records for row in r["samples"])


def test_sample_longer_than_the_model_context_is_refused(samples):
    short = tiny_lm(context_length=256)
    with pytest.raises(HeadwiseError, match="context"):
        protocol.context_parts(short, runner.contexts(samples[("passkey", 768, 0)])[0])


def test_questions_of_different_contexts_are_refused(lm, samples):
    first, second = runner.contexts(samples[("passkey", 768, 0)])
    with pytest.raises(HeadwiseError, match="does not share its context"):
        protocol.context_parts(lm, [first[0], second[0]])


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists(), reason="SmolLM2 tokenizer not cached")
def test_chat_prompt_splits_after_the_context():
    from transformers import AutoTokenizer

    from headwise.models import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    lm = LoadedModel("smollm2-135m", None, tokenizer, None, instruct=True, load_seconds=0.0, from_cache=True)
    sample = tasks.generate("passkey", 512, 1, 0, tasks.token_counter(tokenizer), tokenizer_name="smollm2")[0]
    head, tail = protocol.prompt_parts(lm, sample)
    whole = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], add_generation_prompt=True)
    whole = whole if isinstance(whole, list) else whole["input_ids"]
    assert head == list(whole)[: len(head)]
    assert tokenizer.decode(head + tail) == tokenizer.decode(whole) + sample.answer_prefix  # the model's turn opens
    assert tokenizer.decode(head).endswith(sample.context[-40:])
    assert sample.question in tokenizer.decode(tail)


@pytest.mark.slow
def test_smollm2_one_cell_end_to_end(smollm2, tmp_path):
    questions = tasks.generate("passkey", 1024, 1, 0, tasks.token_counter(smollm2.tokenizer), tokenizer_name="s")
    planned = runner.plan_cells(smollm2.name, ["streaming_llm"], [0.5], ["passkey"], [1024], n_samples=1, seed=0,
                                calibration_seed=None)
    records = runner.sweep(smollm2, planned, lambda t, n, seed: questions, tmp_path / "r.jsonl", progress=False)
    full, compressed = records
    assert full["method"] == "full" and 0.4 < compressed["kv_bytes"] / full["kv_bytes"] < 0.6
    assert compressed["shared_prefill"] and all(row["output"] for row in full["samples"])
    assert all(row["top1"] == 1.0 for row in full["samples"])


def test_a_selection_rule_is_a_resolved_option_and_its_reads_are_recorded(tmp_path, lm, samples):
    plan = runner.make_plan("snapkv", ratio=0.5, options={"select": "quest:budget=96,window=16"})
    resolved = runner.resolved_options(plan)
    assert resolved["select"] == {"rule": "quest", "budget": 96, "fraction": 0.0, "page": 16, "sinks": 4,
                                  "window": 16}
    assert resolved != runner.resolved_options(runner.make_plan("snapkv", ratio=0.5))
    planned = [c for c in cells(methods=("snapkv",), options={"snapkv": {"select": "quest:budget=96,window=16"}})
               if c.task == "passkey"]
    records = run(lm, planned, samples, tmp_path / "results.jsonl")
    selected = [row for r in records if r["method"] == "snapkv" for row in r["samples"]]
    plain = [row for r in records if r["method"] == "full" for row in r["samples"]]
    assert selected and all(0 < row["read_fraction"] < 1 for row in selected)
    assert all(row["read_fraction"] == 1.0 for row in plain)


def test_fidelity_under_selection_reading_everything_is_the_plain_fidelity(lm):
    import torch

    from headwise.api import make_cache
    from headwise.bench.protocol import follow
    from headwise.generation import prefill

    tail, reference = [5, 6, 7], [8, 9, 10, 11]
    ids = torch.randint(2, 200, (1, 300))
    caches = [make_cache(lm.model, "full", select=select) for select in (None, "quest:budget=100000")]
    for cache in caches:
        prefill(lm.model, ids, cache)
        cache.seal()
    plain, stepwise = (follow(lm, cache, tail, reference) for cache in caches)
    assert stepwise[1] == plain[1] and abs(stepwise[0] - plain[0]) < 1e-4


def test_a_selection_rule_runs_as_a_method_reading_what_eviction_at_its_ratio_keeps(tmp_path, lm, samples):
    from headwise.policies import POLICIES
    from headwise.select import SELECTORS

    assert not set(POLICIES) & set(SELECTORS)  # one namespace of methods
    planned = [c for c in cells(methods=("quest", "snapkv"), ratios=(0.75,), options={"quest": {"window": 16}})
               if c.task == "passkey"]
    quest = next(c for c in planned if c.method == "quest")
    assert quest.resolved["select"]["fraction"] == 0.25 and quest.resolved["select"]["window"] == 16
    assert quest.resolved["select"]["budget"] == 0 and runner.plan_arguments("quest", 0.75, {})["policy"] == "full"
    records = run(lm, planned, samples, tmp_path / "results.jsonl")
    by = {(r["context_id"], r["method"]): r for r in records if not r["calibration"]}
    for (context_id, method), record in by.items():
        if method == "quest":  # the whole cache held, about a quarter of it read per step
            assert record["kv_bytes"] == by[context_id, "full"]["kv_bytes"] > by[context_id, "snapkv"]["kv_bytes"]
            assert all(0.2 < row["read_fraction"] < 0.5 for row in record["samples"])
    with pytest.raises(HeadwiseError, match="exactly one"):
        cells(methods=("quest",), options={"quest": {"budget": 64}})


def test_a_snapshot_keeps_only_the_tasks_a_sweep_finished():
    def part(task, method, ratio, context, n=2):
        return {"library": "kvpress", "model": "m", "length": 2048, "task": task, "method": method, "ratio": ratio,
                "protocol": "agnostic", "n_samples": n, "context_id": f"{task}-{context}", "key": f"{task}{method}"
                f"{ratio}{context}", "score": 1.0}

    records = [part(t, m, r, c) for t in ("passkey", "qa") for m, r in (("full", 0.0), ("snapkv", 0.5))
               for c in (0, 1)]
    kept, notes = store.complete_tasks(records)
    assert kept == records and notes == []
    records += [part("vartrack", "full", 0.0, 0), part("vartrack", "snapkv", 0.5, 0)]  # one context of two
    records += [part("frequent", "full", 0.0, c) for c in (0, 1)]  # every context, but no snapkv yet
    kept, notes = store.complete_tasks(records)
    assert {r["task"] for r in kept} == {"passkey", "qa"}
    assert notes == ["kvpress/m/2048/vartrack: 2 cells short of their contexts, 0 settings not started",
                     "kvpress/m/2048/frequent: 0 cells short of their contexts, 1 settings not started"]


def test_sparse_prefill_runs_the_methods_again_measured_against_the_dense_full_cache(tmp_path, lm, samples):
    spec = "ashape:block=16,min_length=0,local_blocks=2"
    planned = [c for c in cells(methods=("snapkv",), sparse=[spec]) if c.task == "passkey"]
    reported = [c for c in planned if not c.calibration]
    assert [(c.method, c.options) for c in reported] == [("full", {}), ("snapkv", {}), ("full", {"sparse": spec}),
                                                         ("snapkv", {"sparse": spec})]
    assert [c.is_reference for c in reported] == [True, False, False, False]
    assert [c.shares_prefill for c in reported] == [True, True, False, False]
    assert reported[2].resolved["sparse"] == "ashape:block=16,min_length=0,last_dense=64,sink_blocks=1,local_blocks=2"
    records = [r for r in run(lm, planned, samples, tmp_path / "r.jsonl") if not r["calibration"]]
    dense = [r for r in records if not r["options"]]
    sparse = [r for r in records if r["options"]]
    assert all(r["computed_fraction"] == 1.0 and "computed_fractions" not in r for r in dense)
    assert all(0 < r["computed_fraction"] < 0.6 for r in sparse)
    assert all(len(r["computed_fractions"]) == 2 and len(r["computed_fractions"][0]) == 2 for r in sparse)  # layers, KV
    reference = {row["id"]: row["nll"] for r in dense if r["method"] == "full" for row in r["samples"]}
    assert all(row["nll_full"] == reference[row["id"]] for r in sparse for row in r["samples"])
