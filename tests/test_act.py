"""ACT (attention-sink calibration): the rule against naive loops, the cache against an eager reference that applies
the rule to every layer's full attention matrix, with eviction and chunked prefill, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from headwise.act import SinkCalibration, hidden_sinks, parse_calibration, recalibrate
from headwise.api import make_cache, make_plan
from headwise.attention import register
from headwise.compat import forward
from headwise.errors import HeadwiseError
from headwise.generation import prefill
from headwise.profile.schema import HeadProfile

# ---------------------------------------------------------------------------------------------- the rule


def naive_hidden_sinks(received: list[float], viewers: list[float], threshold: float) -> list[bool]:
    sinks, first = [], True
    for r, v in zip(received, viewers, strict=True):
        over = v > 0 and r / v > threshold
        sinks.append(over and not first)
        first = first and not over
    return sinks


def naive_recalibrate(row: list[float], sinks: list[bool], beta: float) -> list[float]:
    other = sum(w for w, s in zip(row, sinks, strict=True) if not s)
    if other == 0:
        return list(row)
    removed = sum((1 - beta) * w for w, s in zip(row, sinks, strict=True) if s)
    return [w * beta if s else w + removed * w / other for w, s in zip(row, sinks, strict=True)]


@pytest.mark.parametrize("shape", [(7,), (3, 12), (2, 3, 30)])
def test_hidden_sinks_match_a_loop_skipping_the_first_and_the_unseen(shape):
    g = torch.Generator().manual_seed(sum(shape))
    n = shape[-1]
    viewers = torch.randint(0, 4, (n,), generator=g).float()
    received = torch.rand(shape, generator=g) * viewers
    got = hidden_sinks(received, viewers, 0.4)
    flat = received.reshape(-1, n)
    expected = [naive_hidden_sinks(row.tolist(), viewers.tolist(), 0.4) for row in flat]
    assert got.reshape(-1, n).tolist() == expected
    assert got.shape == received.shape and got.dtype == torch.bool
    # the first key over the threshold is no sink; a key no row saw is none, whatever it received
    assert hidden_sinks(torch.tensor([0.9, 0.9, 0.0, 0.9]), torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5).tolist() == [
        False, True, False, True]
    assert not hidden_sinks(torch.tensor([5.0, 5.0, 5.0]), torch.tensor([1.0, 0.0, 0.0]), 0.5).any()


@pytest.mark.parametrize("shape", [(1, 5), (4, 9), (2, 3, 6, 17)])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_recalibrate_matches_a_loop_and_keeps_rows_summing_to_one(shape, beta):
    g = torch.Generator().manual_seed(len(shape))
    weights = torch.rand(shape, generator=g).softmax(dim=-1)
    sinks = torch.rand((*shape[:-2], 1, shape[-1]), generator=g) < 0.3
    sinks[..., 0] = True  # at least one sink per row
    weights[..., 0, :] = torch.where(sinks[..., 0, :], 1.0 / sinks[..., 0, :].sum(-1, keepdim=True), 0.0)  # all sink
    got = recalibrate(weights, sinks, beta)
    flat_w, flat_s = weights.reshape(-1, shape[-1]), sinks.expand(shape).reshape(-1, shape[-1])
    expected = torch.tensor([naive_recalibrate(w.tolist(), s.tolist(), beta) for w, s in zip(flat_w, flat_s,
                                                                                               strict=True)])
    torch.testing.assert_close(got.reshape(-1, shape[-1]), expected)
    torch.testing.assert_close(got.sum(-1), torch.ones(shape[:-1]))
    torch.testing.assert_close(got[..., 0, :], weights[..., 0, :])  # no mass off the sinks: the row unchanged
    if beta == 1.0:
        torch.testing.assert_close(got, weights)
    if beta == 0.0:  # the sinks get nothing, but in the row that has nothing else
        assert (got[..., 1:, :][sinks.expand(shape)[..., 1:, :]] == 0).all()


# ---------------------------------------------------------------------------------------------- a profile


ROLES = [["mixed", "sink", "mixed", "mixed"], ["sink", "mixed", "mixed", "sink"], ["mixed", "mixed", "sink", "mixed"]]
THRESHOLD = 0.03  # the tiny random model attends almost uniformly: a low threshold finds some sinks in 64 tokens


def act_profile(tmp_path, roles=ROLES) -> str:
    """A profile of a tiny Llama (a layer per row of ``roles``, 4 query heads over 2 KV heads) with these roles per
    query head."""
    layers = len(roles)
    profile = HeadProfile(model="tiny", num_layers=layers, num_heads=4, num_kv_heads=2,
                          layer_types=["full_attention"] * layers, settings={}, thresholds={}, metrics={},
                          kv_metrics={}, roles=roles, kv_roles=[["mixed", "mixed"]] * layers)
    path = tmp_path / "profile.json"
    profile.save(path)
    return str(path)


def test_calibration_options_and_spec(tmp_path):
    path = act_profile(tmp_path)
    act = parse_calibration(f"{path}:beta=0.5,threshold=0.2")
    assert (act.beta, act.threshold, act.profile) == (0.5, 0.2, path)
    assert parse_calibration(path) == SinkCalibration(path)
    assert [act.heads(i) for i in range(3)] == [[1], [0, 3], [2]] and act.count() == 4
    assert "beta 0.5, threshold 0.2, 4 sink heads" in act.describe()
    for spec, message in ((f"{path}:beta=2", "beta must be in"), (f"{path}:threshold=0", "threshold must be in"),
                          (f"{path}:alpha=1", "unknown option"), (f"{path}:beta=x", "expected a float"),
                          ("profile.txt", "act takes PROFILE.json"), (str(tmp_path / "none.json"), "no profile")):
        with pytest.raises(HeadwiseError, match=message):
            parse_calibration(spec)
    with pytest.raises(HeadwiseError, match="labels no query head"):
        (tmp_path / "none").mkdir()
        parse_calibration(act_profile(tmp_path / "none", [["mixed"] * 4] * 3))
    with pytest.raises(HeadwiseError, match="the model has"):
        make_cache(tiny_model("qwen3"), "full", act=path)
    (tmp_path / "short").mkdir()  # a profile of fewer layers than the model: refused before a layer reads it
    with pytest.raises(HeadwiseError, match="the model has"):
        make_cache(tiny_model("llama"), "full", act=act_profile(tmp_path / "short", [["sink"] * 4] * 2))


def test_act_is_refused_where_attention_takes_another_path(tmp_path):
    path = act_profile(tmp_path)
    refusals = [(dict(policy="full", sparse="ashape"), "sparse prefill"),
                (dict(policy="full", select="quest:budget=256"), "decode-time selection"),
                (dict(policy="snapkv", ratio=0.5, options={"compensate": "true"}), "compensate"),
                (dict(policy="kvzip", ratio=0.5), "dense prefill"),
                (dict(policy="snapkv", ratio=0.5, options={"allocation": "global"}), "dense prefill")]
    for kwargs, message in refusals:
        with pytest.raises(HeadwiseError, match=message):
            make_plan(**kwargs, act=path)
    from headwise import dense

    model = tiny_model("llama")
    plan = make_plan("snapkv", ratio=0.5, act=path)
    with pytest.raises(HeadwiseError, match="dense prefill"):
        dense.prefill(model, list(range(2, 66)), plan)
    context = dense.capture(model, torch.arange(2, 66)[None])
    with pytest.raises(HeadwiseError, match="dense prefill"):
        dense.compress(model, context, plan)
    cache = make_cache(model, "full", act=path)
    layer = cache.compressed_layers[0]
    with pytest.raises(HeadwiseError, match="drop act"):
        layer.attention_weights(torch.zeros(1, 4, 1, 16), None, 0.25)


# ---------------------------------------------------------------------------------------------- the reference


class Reference:
    """Eager attention of every layer over its full matrix, with ACT applied to the calibrated heads by the naive
    loops: the prompt's forward (batch 1, no padding) finds each head's sinks from its own map; later forwards use
    them (a position beyond the prompt is no sink)."""

    def __init__(self, act: SinkCalibration) -> None:
        self.act = act
        self.sinks: dict[tuple[int, int], list[bool]] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        _, hq, q, _ = query.shape
        n = key.shape[2]
        group = hq // key.shape[1]
        causal = torch.arange(n)[None, :] <= torch.arange(n - q, n)[:, None]
        logits = query @ key.repeat_interleave(group, dim=1).mT * scaling
        weights = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        for head in self.act.heads(module.layer_idx):
            if q > 1:
                received, viewers = weights[0, head].sum(dim=0), causal.sum(dim=0)
                self.sinks[module.layer_idx, head] = naive_hidden_sinks(received.tolist(), viewers.tolist(),
                                                                        self.act.threshold)
            sinks = self.sinks[module.layer_idx, head]
            sinks = (sinks + [False] * n)[:n]
            weights[0, head] = torch.tensor([naive_recalibrate(row, sinks, self.act.beta)
                                             for row in weights[0, head].tolist()])
        output = weights @ value.repeat_interleave(group, dim=1)
        return output.transpose(1, 2), None


def reference_logits(model, act: SinkCalibration, ids: torch.Tensor, step: torch.Tensor) -> list[torch.Tensor]:
    """The last logits after the prompt ``ids`` and after one more token ``step``, by :class:`Reference`."""
    register("act_reference", Reference(act))
    model.set_attn_implementation("act_reference")
    try:
        cache = DynamicCache(config=model.config)
        first = forward(model, cache, ids).logits[:, -1]
        return [first, forward(model, cache, step).logits[:, -1]]
    finally:
        model.set_attn_implementation("headwise")


def headwise_logits(model, cache, ids: torch.Tensor, step: torch.Tensor, chunk_size: int | None = None):
    return [prefill(model, ids, cache, chunk_size=chunk_size), forward(model, cache, step).logits[:, -1]]


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 128, (1, 64), generator=g), torch.randint(2, 128, (1, 1), generator=g)


@torch.no_grad()
@pytest.mark.parametrize("block", [256, 24])
def test_act_through_the_cache_equals_the_eager_reference_at_prefill_and_decoding(tmp_path, prompt, block,
                                                                                   monkeypatch):
    import headwise.cache

    monkeypatch.setattr(headwise.cache, "QUERY_BLOCK", block)  # 24: several blocks of queries in each pass
    model = tiny_model("llama")
    ids, step = prompt
    act = parse_calibration(f"{act_profile(tmp_path)}:threshold={THRESHOLD}")
    cache = make_cache(model, "full", act=act)
    got = headwise_logits(model, cache, ids, step)
    expected = reference_logits(model, act, ids, step)
    found = [int(layer.sinks.sum()) for layer in cache.compressed_layers]
    assert all(0 < f < 64 * len(act.heads(i)) for i, f in enumerate(found))  # some sinks, not all keys
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    plain = headwise_logits(model, make_cache(model, "full"), ids, step)
    assert (got[0] - plain[0]).abs().max() > 1e-3  # calibration changed the answer
    # beta=1 changes nothing
    same = headwise_logits(model, make_cache(model, "full", act=f"{act.profile}:beta=1,threshold={THRESHOLD}"), ids,
                           step)
    for g, e in zip(same, plain, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    # a chunked prefill keeps its statistics per position: with beta=1 (the same hidden states) the same sinks; with
    # calibration its first chunks are calibrated with the sinks found so far, so it answers otherwise
    whole = make_cache(model, "full", act=f"{act.profile}:beta=1,threshold={THRESHOLD}")
    chunked = make_cache(model, "full", act=f"{act.profile}:beta=1,threshold={THRESHOLD}")
    prefill(model, ids, whole)
    prefill(model, ids, chunked, chunk_size=24)
    for a, b in zip(chunked.compressed_layers, whole.compressed_layers, strict=True):
        assert torch.equal(a.sinks, b.sinks)
        torch.testing.assert_close(a.sink_stats, b.sink_stats)


@torch.no_grad()
def test_act_with_eviction_decodes_with_the_sinks_found_in_the_prompt(tmp_path, prompt):
    model = tiny_model("llama")
    ids, step = prompt
    spec = f"{act_profile(tmp_path)}:threshold={THRESHOLD}"
    full = make_cache(model, "full", act=spec)
    prefill(model, ids, full)
    cache = make_cache(model, "snapkv", ratio=0.5, options={"window": 8}, act=spec)
    prefill(model, ids, cache)
    assert all(k == 32 for kept in cache.kept() for k in kept)
    before = [layer.sinks.clone() for layer in cache.compressed_layers]
    logits = forward(model, cache, step).logits[:, -1]
    for layer, found, prompt_sinks in zip(cache.compressed_layers, (f.sinks for f in full.compressed_layers), before,
                                          strict=True):
        assert torch.equal(layer.sinks[..., :64], found) and torch.equal(prompt_sinks, found)  # no decode stats
        group = 4 // len(layer.heads)
        for h, members in layer.calibrating(group).items():
            stats = [c for _, c in members]
            positions = layer.heads[h].positions[0].long()
            expected = found[0, stats][:, positions.clamp(max=63)] & (positions < 64)
            held = layer.held_sinks(layer.heads[h], stats)
            assert held is not None and torch.equal(held[0], expected)
    plain = headwise_logits(model, make_cache(model, "snapkv", ratio=0.5, options={"window": 8}), ids, step)
    assert (logits - plain[1]).abs().max() > 1e-3
    # beta=1: the logits of snapkv without act, decoding step included
    one = make_cache(model, "snapkv", ratio=0.5, options={"window": 8}, act=f"{spec},beta=1")
    for g, e in zip(headwise_logits(model, one, ids, step), plain, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_left_padded_row_finds_and_uses_the_sinks_of_its_tokens_alone(tmp_path, prompt):
    model = tiny_model("llama")
    ids, step = prompt
    spec = f"{act_profile(tmp_path)}:threshold={THRESHOLD}"
    short = ids[:, :40]
    padded = torch.cat([torch.zeros(1, 24, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.ones(1, 64), torch.cat([torch.zeros(1, 24), torch.ones(1, 40)], dim=1)]).long()
    cache = make_cache(model, "full", act=spec)
    batch = forward(model, cache, torch.cat([ids, padded]), attention_mask=mask).logits[:, -1]
    alone = make_cache(model, "full", act=spec)
    torch.testing.assert_close(batch[1:], prefill(model, short, alone), rtol=1e-4, atol=1e-4)
    for a, b in zip(cache.compressed_layers, alone.compressed_layers, strict=True):
        assert not a.sinks[1, :, :24].any() and torch.equal(a.sinks[1, :, 24:], b.sinks[0]) and b.sinks.any()
    steps = forward(model, cache, torch.cat([step, step]), attention_mask=torch.cat([mask, torch.ones(2, 1)], 1).long())
    torch.testing.assert_close(steps.logits[1:, -1], forward(model, alone, step).logits[:, -1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_saved_cache_keeps_its_sinks(tmp_path, prompt):
    from headwise.cache import HeadwiseCache

    model = tiny_model("llama")
    ids, step = prompt
    cache = make_cache(model, "snapkv", ratio=0.5, options={"window": 8},
                       act=f"{act_profile(tmp_path)}:threshold={THRESHOLD}")
    prefill(model, ids, cache)
    cache.seal()
    loaded = HeadwiseCache.from_tensors(model.config, cache.plan, cache.to_tensors())
    for a, b in zip(loaded.compressed_layers, cache.compressed_layers, strict=True):
        assert torch.equal(a.sinks, b.sinks)
    torch.testing.assert_close(forward(model, loaded, step).logits, forward(model, cache, step).logits)


# ---------------------------------------------------------------------------------------------- bench


def test_bench_runs_every_method_again_with_act_on_its_own_prefill(tmp_path):
    from bench_helpers import count_words, tiny_lm
    from headwise.bench import runner, tasks
    from headwise.report.bench_report import harmonize

    lm = tiny_lm()  # 2 layers, 4 query heads over 2 KV heads
    path = act_profile(tmp_path, ROLES[:2])
    spec = f"{path}:threshold={THRESHOLD}"
    planned = runner.plan_cells("tiny-llama", ["snapkv"], [0.5], ["passkey"], [512], n_samples=1, seed=0,
                                calibration_seed=None, act=[spec])
    assert [(c.method, c.options) for c in planned] == [("full", {}), ("snapkv", {}), ("full", {"act": spec}),
                                                        ("snapkv", {"act": spec})]
    assert [c.shares_prefill for c in planned] == [True, True, False, False]
    assert planned[2].resolved["act"] == {"calibration": parse_calibration(spec).describe(),
                                          "sha256": runner._file_digest(path)}
    samples = {("passkey", 512, 0): tasks.generate("passkey", 512, 1, 0, count_words, tokenizer_name="words")}
    records = runner.sweep(lm, planned, lambda t, n, seed: samples[(t, n, seed)], tmp_path / "r.jsonl",
                           progress=False)
    assert [r["shared_prefill"] for r in records] == [True, True, False, False]
    assert [harmonize(r)["method"] for r in records] == ["full", "snapkv", f"full act={spec}", f"snapkv act={spec}"]
    reference = {row["id"]: row["nll"] for row in records[0]["samples"]}
    assert all(row["nll_full"] == reference[row["id"]] for r in records[2:] for row in r["samples"])
    changed = HeadProfile.load(path)
    changed.settings = {"edited": True}
    changed.save(path)  # the same heads, another file: another key
    again = runner.plan_cells("tiny-llama", ["snapkv"], [0.5], ["passkey"], [512], n_samples=1, seed=0,
                              calibration_seed=None, act=[spec])
    assert again[2].key() != planned[2].key() and again[0].key() == planned[0].key()


def test_bench_refuses_act_with_kvzip_before_loading(tmp_path, capsys, monkeypatch):
    import headwise.models
    from headwise.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # found by name, never loaded
    monkeypatch.setattr(headwise.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["bench", "--model", str(model), "--out", str(tmp_path / "out"), "--act", act_profile(tmp_path)]
    assert main([*argv, "--methods", "kvzip"]) == 2
    err = capsys.readouterr().err
    assert "dense prefill" in err and "kvzip" in err and len(err.strip().splitlines()) == 1
    assert main([*argv, "--methods", "quest"]) == 2
    assert "decode-time selection" in capsys.readouterr().err
    assert main(["generate", "--act", act_profile(tmp_path), "--sparse", "ashape", "hi"]) == 2
    assert "takes no sparse prefill" in capsys.readouterr().err
