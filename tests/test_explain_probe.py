"""The lookback probe's pieces: labels, AUROC against a pairwise loop, the fitted probe against scikit-learn, the
JSON file, the evaluation on synthetic data, and the commands' refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.explain.labels import first_clause, supported
from headwise.explain.probe import Probe, auroc, auroc_interval, fit, out_of_fold
from headwise.explain.training import Dataset, evaluate, markdown

CONTEXT = "Prose about Python. The door code is 57040. Remember it. 57040 is the door code. Marta lives in Porto."


@pytest.mark.parametrize(("output", "expected"), [
    ("57040.", True), ("57040. Remember it. 57040", True), ("Porto.", True), ("lives in Porto", True),
    ("123456.", False), ("Porto, Portugal.", False), ("New York City.", False), ("1.", False), ("The", False),
    ("", False), (":\n\nThe door code is 57040", False), ("**57040**", True),
])
def test_supported_reads_the_first_clause(output, expected):
    assert supported(output, CONTEXT) is expected


def test_first_clause_keeps_decimals():
    assert first_clause("It is 3.14 exactly. Then more") == "It is 3.14 exactly"


def naive_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_a_pairwise_loop_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, 30).astype(float)  # many ties
        labels = rng.integers(0, 2, 30)
        assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels))
    assert auroc([0.1, 0.2], [1, 1]) != auroc([0.1, 0.2], [1, 1])  # nan with one class


def test_auroc_interval_brackets_the_estimate_and_resamples_clusters():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = labels + rng.normal(0, 1.0, 200)
    clusters = [i // 4 for i in range(200)]
    lo, hi = auroc_interval(scores, labels, clusters)
    assert lo < auroc(scores, labels) < hi
    assert auroc_interval(scores, labels, [0] * 200) == pytest.approx((auroc(scores, labels),) * 2)


def synthetic(n: int = 240, signal: float = 1.5, seed: int = 0) -> Dataset:
    """Answers whose unsupported ones look back less in heads 0 and 3 (of 2 layers x 3 heads)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0.5, 0.1, (n, 6))
    x[:, 0] -= 0.1 * signal * y
    x[:, 3] -= 0.1 * signal * y
    tasks = ["passkey", "multikey", "qa"]
    return Dataset("tiny", 2, 3, x, y, [f"c{i // 3}" for i in range(n)], [tasks[(i // 3) % 3] for i in range(n)],
                   ["full@0" if i % 2 else "snapkv@0.9" for i in range(n)], rng.integers(1, 9, n).astype(float))


def test_fit_standardises_and_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = synthetic()
    mean, scale, weights, bias = fit(data.x, data.y)
    probe = Probe("tiny", 2, 3, list(range(6)), mean.tolist(), scale.tolist(), weights.tolist(), bias)
    scaled = StandardScaler().fit_transform(data.x)
    want = LogisticRegression(max_iter=5000).fit(scaled, data.y).predict_proba(scaled)[:, 1]
    np.testing.assert_allclose(probe.probability(data.x.reshape(-1, 2, 3)), want, rtol=1e-6)
    assert weights[0] < 0 and weights[3] < 0  # less lookback: more likely unsupported


def test_probe_file_round_trip_and_refusals(tmp_path):
    probe = Probe("tiny", 2, 3, [0, 3], [0.5, 0.5], [0.1, 0.1], [-1.0, -2.0], 0.3, {"auroc": 0.9})
    path = tmp_path / "probe.json"
    probe.save(path)
    assert Probe.load(path) == probe
    with pytest.raises(HeadwiseError, match="another model"):
        probe.probability(np.zeros((4, 3)))
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(HeadwiseError, match="not a headwise lookback probe"):
        Probe.load(path)
    with pytest.raises(HeadwiseError, match="outside"):
        Probe("tiny", 2, 3, [6], [0.0], [1.0], [1.0], 0.0)


def test_out_of_fold_keeps_groups_apart_and_finds_the_signal():
    data = synthetic()
    oof = out_of_fold(data.x, data.y, data.contexts)
    assert not np.isnan(oof).any()
    assert auroc(oof, data.y) > 0.75
    noise = synthetic(signal=0.0)
    assert auroc(out_of_fold(noise.x, noise.y, noise.contexts), noise.y) < 0.65


def test_evaluate_reports_cross_validated_and_heldout_aurocs():
    data = synthetic()
    roles = [["retrieval", "local", "sink"], ["retrieval", "local", "local"]]
    figures = evaluate(data, ["qa"], roles=roles, draws=2)
    assert figures["train_tasks"] == ["multikey", "passkey"]
    assert figures["cross_validated"]["auroc"] > 0.75 and figures["heldout"]["qa"]["auroc"] > 0.75
    assert figures["heads"]["retrieval_only"]["auroc"] > 0.75  # heads 0 and 3 carry the signal here
    assert {h["role"] for h in figures["heads"]["top_heads"][:2]} == {"retrieval"}
    table = markdown(figures)
    assert "held-out task: qa" in table and "within the full cache" in table
    assert figures["length_only"]["auroc"] < 0.7  # the synthetic lengths carry no signal
    assert set(figures["per_cache"]) == {"full@0", "snapkv@0.9"} and "within one cache" in table
    with pytest.raises(HeadwiseError, match="not in the data"):
        evaluate(data, ["vartrack"])


@pytest.mark.parametrize(("argv", "message"), [
    (["lookback", "train", "--data", "missing.jsonl", "--out", "p.json"], "does not exist"),
    (["lookback", "train", "--data", "x", "--out", "p.json", "--strength", "0"], "--strength"),
    (["lookback", "score", "hello", "--probe", "p.json", "--span", "0"], "--span"),
    (["lookback", "score", "hello", "--probe", "missing.json"], "cannot read the lookback probe"),
    (["lookback", "score", "hello", "--probe", "p.json", "--ratio", "0.5"], "without --policy"),
    (["lookback", "collect", "--out", "o", "--tasks", "nope"], "unknown task"),
    (["lookback", "collect", "--out", "o", "--methods", "nope"], "unknown method"),
])
def test_lookback_commands_refuse_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
