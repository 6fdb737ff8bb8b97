"""The head-aware policy: role budgets (pure function) and its use of a profile on a tiny model."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import tiny_model
from headwise.api import make_cache
from headwise.errors import HeadwiseError
from headwise.generation import prefill
from headwise.policies.headwise import role_budgets
from headwise.profile.schema import HeadProfile


@pytest.mark.parametrize("seed", range(20))
def test_role_budgets_meet_the_total_exactly_and_serve_retrieval_first(seed):
    rng = random.Random(seed)
    heads = rng.randrange(1, 12)
    kinds = [rng.choice(["retrieval", "streaming", "other"]) for _ in range(heads)]
    strength = [rng.random() for _ in range(heads)]
    n, floor = rng.randrange(1, 300), rng.randrange(0, 80)
    total = rng.randrange(0, heads * n + 50)
    counts = role_budgets(kinds, strength, n, total, floor)
    assert sum(counts) == min(total, heads * n)
    assert all(0 <= c <= n for c in counts)
    if heads * min(floor, n) < min(total, heads * n):
        retrieval = sorted((i for i, k in enumerate(kinds) if k == "retrieval"), key=lambda i: -strength[i])
        others = [i for i, k in enumerate(kinds) if k != "retrieval"]
        # A non-retrieval head grows past its floor only once every retrieval head keeps everything.
        if any(counts[i] > min(floor, n) for i in others):
            assert all(counts[i] == n for i in retrieval)
        # Stronger retrieval heads are never served less than weaker ones.
        assert all(counts[a] >= counts[b] for a, b in itertools.pairwise(retrieval))


def test_role_budgets_streaming_heads_keep_only_the_floor_while_others_can_grow():
    counts = role_budgets(["retrieval", "streaming", "other", "other"], [0.4, 0, 0, 0], 100, 200, 10)
    assert counts == [100, 10, 45, 45]


def synthetic_profile(model, tmp_path, kv_roles, retrieval) -> str:
    cfg = model.config
    layers, heads, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    group = heads // kv
    profile = HeadProfile(
        model="tiny", num_layers=layers, num_heads=heads, num_kv_heads=kv,
        layer_types=list(getattr(cfg, "layer_types", None) or ["full_attention"] * layers),
        settings={}, thresholds={},
        metrics={"retrieval": [[retrieval[layer][h // group] for h in range(heads)] for layer in range(layers)]},
        kv_metrics={"retrieval": retrieval},
        roles=[[kv_roles[layer][h // group] for h in range(heads)] for layer in range(layers)],
        kv_roles=kv_roles,
    )
    path = tmp_path / "profile.json"
    profile.save(path)
    return str(path)


def test_headwise_policy_frees_streaming_heads_and_keeps_retrieval_heads(tmp_path):
    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    retrieval = [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]]
    path = synthetic_profile(model, tmp_path, roles, retrieval)
    n, ratio = 200, 0.6
    cache = make_cache(model, "headwise", ratio=ratio, options={"profile": path, "sinks": 2, "window": 10})
    prefill(model, torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0)), cache)
    kept = cache.kept()
    assert kept[0][0] == n  # the retrieval head keeps everything
    assert kept[0][1] == kept[1][1] == kept[2][0] == 12  # streaming heads: sinks + window
    assert sum(map(sum, kept)) == round((1 - ratio) * n) * 6  # the total meets the ratio exactly
    assert kept[1][0] == kept[2][1] > 12
    streaming = cache.compressed_layers[0].heads[1]
    assert streaming.positions[0].tolist() == [0, 1, *range(n - 10, n)]


def test_headwise_policy_errors(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(HeadwiseError, match="needs a profile"):
        make_cache(model, "headwise", ratio=0.5)
    with pytest.raises(HeadwiseError, match="no profile"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": str(tmp_path / "none.json")})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(HeadwiseError, match="corrupted"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": str(broken)})
    other = tiny_model("qwen3")  # 3 layers x 2 KV heads but 6 query heads
    path = synthetic_profile(other, tmp_path, [["mixed", "mixed"]] * 3, [[0.0, 0.0]] * 3)
    with pytest.raises(HeadwiseError, match="profile this model"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": path})
    good = synthetic_profile(model, tmp_path, [["mixed", "mixed"]] * 3, [[0.0, 0.0]] * 3)
    with pytest.raises(HeadwiseError, match="no schedule or allocation"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": good, "schedule": "pyramid"})
    data = json.loads((tmp_path / "profile.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "profile.json").write_text(json.dumps(data))
    with pytest.raises(HeadwiseError, match="schema version"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": good})
