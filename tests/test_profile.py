"""Profile maths against naive references, the HeadProfile file format, and the profiler on tiny models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from headwise.capture import CaptureSettings
from headwise.errors import HeadwiseError
from headwise.profile import HeadProfile, ProfileSettings, RoleThresholds, profile_model
from headwise.profile.data import needle_task, prose_ids, repeated_random_ids, stdlib_paragraphs
from headwise.profile.metrics import aggregate_kv, assign_roles, copy_paste_hits, sink_scores
from headwise.profile.report import render_html, write_outputs
from profile_helpers import fake_answer, tiny_loaded

SMALL = ProfileSettings(length=96, repeat_length=40, runs=2, sample_tokens=40, max_new_tokens=4)


def test_copy_paste_hits_matches_definition():
    prompt = [9, 9, 5, 6, 7, 9, 9]
    needle = [2, 3, 4]  # tokens 5 6 7
    generated = [5, 6, 8, 7]
    # layer 0: head 0 copies every needle token; head 1 looks at the right token once and elsewhere otherwise
    argmax = torch.tensor([[[2, 3, 4, 4], [2, 0, 3, 6]]])
    hits = copy_paste_hits(argmax, generated, prompt, needle)
    assert hits.tolist() == [[1.0, 1 / 3]]


def test_copy_paste_counts_each_needle_position_once():
    hits = copy_paste_hits(torch.tensor([[[2, 2, 2]]]), [5, 5, 5], [0, 0, 5, 5], [2, 3])
    assert hits.tolist() == [[0.5]]


def test_sink_scores():
    received = torch.tensor([[0.6, 0.2, 0.05, 0.9], [0.1, 0.35, 0.0, 0.0]], dtype=torch.float64)
    seen = torch.tensor([100.0, 99.0, 98.0, 1.0])
    out = sink_scores(received, seen, RoleThresholds(min_seen=64))
    assert out["sink_first"].tolist() == [0.6, 0.1]
    assert out["sink_other"].tolist() == [0.2, 0.35]  # position 3 is seen by one query only
    assert out["sinks_gu"].tolist() == [1, 1]
    assert out["sinks_act"].tolist() == [2, 1]


def test_aggregate_kv_groups_consecutive_heads():
    values = torch.tensor([[1.0, 3.0, 2.0, 8.0]])
    assert aggregate_kv(values, 2, "max").tolist() == [[3.0, 8.0]]
    assert aggregate_kv(values, 2, "min").tolist() == [[1.0, 2.0]]
    assert aggregate_kv(values, 2, "mean").tolist() == [[2.0, 5.0]]


def test_roles_follow_thresholds_in_order():
    nan = float("nan")
    metrics = {
        "retrieval": torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.0]]),
        "induction": torch.tensor([[0.9, 0.6, 0.0, 0.0, nan]]),
        "sink_first": torch.tensor([[0.9, 0.9, 0.8, 0.1, 0.1]]),
        "locality_256": torch.tensor([[1.0, 1.0, 1.0, 0.95, 0.5]]),
    }
    assert assign_roles(metrics, RoleThresholds()) == [["retrieval", "induction", "sink", "local", "mixed"]]
    assert assign_roles(metrics, RoleThresholds(retrieval=0.6, local=0.99))[0][0] == "induction"
    with pytest.raises(HeadwiseError, match="window 64"):
        assign_roles(metrics, RoleThresholds(local_window=64))


def test_calibration_inputs_are_reproducible():
    from profile_helpers import CharTokenizer

    tok = CharTokenizer()
    assert len(stdlib_paragraphs()) > 100
    assert prose_ids(tok, 300, 3) == prose_ids(tok, 300, 3) != prose_ids(tok, 300, 4)
    ids = repeated_random_ids(tok, 41, 0)
    assert len(ids) == 41 and ids[1:21] == ids[21:]
    task = needle_task(tok, 400, 7, chat=False)
    assert "".join(chr(task.ids[j] - 2) for j in task.needle_positions) == task.answer
    assert task == needle_task(tok, 400, 7, chat=False)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_profile_tiny_models(arch, monkeypatch, tmp_path):
    lm = tiny_loaded(arch)
    fake_answer(monkeypatch, lm)
    result = profile_model(lm, SMALL, progress=False)
    p = result.profile
    info = lm.info
    assert p.retrieval_runs["passed"] == 2 and p.retrieval_runs["failed"] == 0
    for name, rows in p.metrics.items():
        assert len(rows) == info.num_layers and all(len(r) == info.num_heads for r in rows), name
    assert p.metric("retrieval").max() <= 1.0
    assert set(p.metrics) >= {"sink_first", "locality_16", "locality_64", "entropy", "prev_token", "induction"}
    kv = p.metric("locality_16", kv=True)
    assert kv.shape == (info.num_layers, info.num_kv_heads)
    assert torch.equal(kv, aggregate_kv(p.metric("locality_16"), info.group_size, "min"))
    assert result.maps.shape == (info.num_layers, info.num_heads, 64, 64)
    p.save(tmp_path / "profile.json")
    loaded = HeadProfile.load(tmp_path / "profile.json", expect=(info.num_layers, info.num_heads, info.num_kv_heads))
    assert loaded.roles == p.roles
    assert torch.allclose(loaded.metric("entropy"), p.metric("entropy"), atol=1e-6)


def test_profile_fails_loudly_when_every_needle_run_is_wrong():
    lm = tiny_loaded("llama")  # a random model never answers
    with pytest.raises(HeadwiseError, match="all 2 needle-in-a-haystack runs answered wrong"):
        profile_model(lm, SMALL, progress=False)


def test_failed_runs_are_counted_and_reported(monkeypatch, capsys):
    import headwise.profile.profiler as profiler

    lm = tiny_loaded("llama")
    fake_answer(monkeypatch, lm)
    real = profiler.decode
    calls = []

    def sometimes_wrong(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) if len(calls) == 1 else [0]

    monkeypatch.setattr(profiler, "decode", sometimes_wrong)
    result = profile_model(lm, SMALL, progress=False)
    runs = result.profile.retrieval_runs
    assert (runs["passed"], runs["failed"]) == (1, 1)
    assert "WARNING" in capsys.readouterr().err
    html = render_html(result, {})
    assert "failed the correctness gate" in html


@pytest.fixture(scope="module")
def tiny_result():
    lm = tiny_loaded("llama")
    mp = pytest.MonkeyPatch()
    fake_answer(mp, lm)
    try:
        return profile_model(lm, SMALL, progress=False)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def saved(tiny_result, tmp_path_factory):
    paths = write_outputs(tiny_result, tmp_path_factory.mktemp("profile"))
    assert paths["retrieval"].read_bytes().startswith(b"\x89PNG")
    assert paths["report"].read_text().startswith("<!DOCTYPE html>")
    return paths["profile"]


def test_load_rejects_corrupted_file(saved, tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(saved.read_text()[:100])
    with pytest.raises(HeadwiseError, match="corrupted"):
        HeadProfile.load(bad)
    with pytest.raises(HeadwiseError, match="no profile"):
        HeadProfile.load(tmp_path / "missing.json")


def test_load_rejects_wrong_schema_and_bad_shapes(saved, tmp_path):
    data = json.loads(saved.read_text())
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(HeadwiseError, match="schema version 99"):
        HeadProfile.load(bad)
    data["metrics"]["entropy"] = data["metrics"]["entropy"][:-1]
    bad.write_text(json.dumps(data))
    with pytest.raises(HeadwiseError, match="'entropy' is not 3 layers"):
        HeadProfile.load(bad)
    del data["roles"]
    bad.write_text(json.dumps(data))
    with pytest.raises(HeadwiseError, match="malformed"):
        HeadProfile.load(bad)


def test_load_rejects_model_mismatch(saved):
    assert HeadProfile.load(saved, expect=(3, 4, 2)).model == "tiny-llama"
    with pytest.raises(HeadwiseError, match="has 3 layers, 4 heads, 2 KV heads but the model has 30, 9, 3"):
        HeadProfile.load(saved, expect=(30, 9, 3))


def test_html_escapes_tokens_and_is_self_contained(tiny_result):
    result = dataclasses.replace(tiny_result, sample_tokens=list(tiny_result.sample_tokens),
                                 profile=dataclasses.replace(tiny_result.profile))
    result.sample_tokens[3] = "<script>alert(1)</script>"
    result.profile.sinks = [{"position": 3, "token": "<script>", "heads_gu": 1, "heads_act": 2}]
    html = render_html(result, {})
    assert html.count("<script") == 2  # the JSON data block and the page's own script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "http://" not in html and "https://" not in html


@pytest.mark.slow
def test_profile_smollm2_short(smollm2, tmp_path):
    """The real model answers the needle, so retrieval scores come from a real copy-paste run."""
    settings = ProfileSettings(length=160, repeat_length=128, runs=1, max_new_tokens=32,
                               capture=CaptureSettings(windows=(16, 64)), thresholds=RoleThresholds(local_window=64))
    result = profile_model(smollm2, settings, progress=False)
    p = result.profile
    assert p.retrieval_runs["passed"] == 1, p.retrieval_runs
    assert p.metric("retrieval").max() > 0.1
    assert p.metric("sink_first").mean() > 0.3  # the first token is a strong sink in most heads
    HeadProfile.load(write_outputs(result, tmp_path)["profile"], expect=(30, 9, 3))


def test_cli_rejects_bad_settings_before_loading_a_model(capsys):
    from headwise.cli import main

    assert main(["profile", "--length", "10", "--out", "unused"]) == 2
    assert "--length must be >= 64" in capsys.readouterr().err
    assert main(["profile", "--runs", "0"]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err
