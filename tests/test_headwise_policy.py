"""The head-aware policy: role budgets (pure function) and its use of a profile on a tiny model."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from conftest import tiny_model
from headwise.api import make_cache
from headwise.errors import HeadwiseError
from headwise.generation import prefill
from headwise.policies.headwise import coverage_budgets, promote_far_heads, role_budgets
from headwise.profile.schema import HeadProfile


def random_heads(rng: random.Random, most: int) -> tuple[int, list[str], list[float]]:
    """Fewer than ``most`` heads, each of a random kind and retrieval strength."""
    heads = rng.randrange(1, most)
    kinds = [rng.choice(["retrieval", "streaming", "other"]) for _ in range(heads)]
    return heads, kinds, [rng.random() for _ in range(heads)]


@pytest.mark.parametrize("seed", range(20))
def test_role_budgets_meet_the_total_exactly_and_serve_retrieval_first(seed):
    rng = random.Random(seed)
    heads, kinds, strength = random_heads(rng, 12)
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


def concave_curve(rng: random.Random, n: int) -> list[tuple[int, float]]:
    """Random measured points (tokens, mass) whose linear interpolation up to (n, 1) is concave."""
    tokens = sorted(rng.sample(range(1, n), rng.randrange(0, min(4, n - 1) + 1)))
    gains = sorted((rng.random() for _ in range(len(tokens) + 1)), reverse=True)
    edges = [0, *tokens, n]
    slopes = [g / (b - a) for g, a, b in zip(gains, edges, edges[1:], strict=False)]
    slopes.sort(reverse=True)  # decreasing slopes: concave
    mass, points = 0.0, []
    for a, b, slope in zip(edges, edges[1:], slopes, strict=False):
        mass += slope * (b - a)
        points.append((b, mass))
    scale = points[-1][1]
    return [(t, m / scale) for t, m in points[:-1]]


def covered(curve: list[tuple[int, float]], n: int, tokens: int) -> float:
    """Mass covered by ``tokens`` on the linear interpolation of (0, 0), ``curve`` and (n, 1)."""
    xs, ys = zip(*[(0, 0.0), *curve, (n, 1.0)], strict=True)
    return float(np.interp(tokens, xs, ys))


@pytest.mark.parametrize("seed", range(30))
def test_coverage_budgets_match_a_brute_force_optimum_on_concave_curves(seed):
    rng = random.Random(seed)
    heads, n = rng.randrange(1, 4), rng.randrange(2, 13)
    curves = [concave_curve(rng, n) for _ in range(heads)]
    total = rng.randrange(0, heads * n + 3)
    counts = coverage_budgets(curves, n, total)
    assert sum(counts) == min(total, heads * n) and all(0 <= c <= n for c in counts)
    best = max(
        sum(covered(c, n, t) for c, t in zip(curves, split, strict=True))
        for split in itertools.product(range(n + 1), repeat=heads)
        if sum(split) == min(total, heads * n)
    )
    assert sum(covered(c, n, t) for c, t in zip(curves, counts, strict=True)) == pytest.approx(best)


def test_coverage_budgets_give_far_reaching_heads_the_long_windows():
    local = [(10, 0.99), (50, 1.0)]  # everything within 10 tokens
    spread = [(10, 0.2), (50, 0.5)]  # attention all over the context
    assert coverage_budgets([local, spread, local], 100, 120) == [10, 100, 10]
    # A dip in the measured points (noise) does not make coverage shrink: (20, 0.3) counts as (20, 0.5).
    assert coverage_budgets([[(10, 0.5), (20, 0.3)], [(10, 0.1)]], 100, 20) == [10, 10]


def test_role_budgets_with_curves_share_what_retrieval_leaves_by_coverage():
    curves = [[(20, 0.5)], [(20, 1.0)], [(20, 0.2), (60, 0.9)], [(20, 0.2)]]
    counts = role_budgets(["retrieval", "streaming", "other", "streaming"], [0.5, 0, 0, 0], 100, 260, 10, curves)
    # Retrieval keeps all; the local head stops where it covers everything; past the floor of 10, head 2 gains
    # 0.02 per token up to 20 tokens, then 0.0175 up to 60, then 0.0025; head 3 gains 0.02 then 0.01 per token:
    # the 120 tokens left go 10 + 10 (0.02), 40 to head 2 (0.0175), the last 60 to head 3 (0.01).
    assert counts == [100, 20, 60, 80]


def synthetic_profile(model, tmp_path, kv_roles, retrieval, kv_metrics=None, settings=None, locality=True) -> str:
    """A profile of ``model`` with these roles and retrieval scores; unless ``kv_metrics`` has its own or
    ``locality`` is False, every head covers half its attention with the sinks plus 8 keys, 0.8 with 32,
    as ``headwise profile`` measures it (the coverage budgets read these curves)."""
    cfg = model.config
    layers, heads, kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    group = heads // kv
    if locality and not kv_metrics:
        kv_metrics = {f"locality_{w}": [[m] * kv for _ in range(layers)] for w, m in ((8, 0.5), (32, 0.8))}
        settings = {"windows": [8, 32], "n_sink": 2, **(settings or {})}
    profile = HeadProfile(
        model="tiny", num_layers=layers, num_heads=heads, num_kv_heads=kv,
        layer_types=list(getattr(cfg, "layer_types", None) or ["full_attention"] * layers),
        settings=settings or {}, thresholds={},
        metrics={"retrieval": [[retrieval[layer][h // group] for h in range(heads)] for layer in range(layers)]},
        kv_metrics={"retrieval": retrieval, **(kv_metrics or {})},
        roles=[[kv_roles[layer][h // group] for h in range(heads)] for layer in range(layers)],
        kv_roles=kv_roles,
    )
    path = tmp_path / "profile.json"
    profile.save(path)
    return str(path)


NEAR = {"locality_8": 0.97, "locality_32": 1.0}  # the sinks plus 8 keys cover 97% of the head's attention
FAR = {"locality_8": 0.1, "locality_32": 0.3}


def profile_with_locality(model, tmp_path, roles, heads) -> str:
    """A profile of the tiny model (3 layers x 2 KV heads) with these roles, one retrieval score of 0.6 (layer 0,
    head 0) and 0.05 (layer 2, head 1), and each head's locality curve NEAR or FAR (None: zeros)."""
    metrics = {m: [[0.0 if h is None else h[m] for h in layer] for layer in heads] for m in NEAR}
    retrieval = [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]]
    return synthetic_profile(model, tmp_path, roles, retrieval, metrics, {"windows": [8, 32], "n_sink": 2})


def test_headwise_policy_frees_streaming_heads_and_keeps_retrieval_heads(tmp_path):
    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    retrieval = [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]]
    path = synthetic_profile(model, tmp_path, roles, retrieval)
    n, ratio = 200, 0.6
    cache = make_cache(model, "headwise", ratio=ratio,
                       options={"profile": path, "sinks": 2, "window": 10, "budgets": "roles"})
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


def test_headwise_coverage_budgets_give_each_head_a_window_sized_by_its_locality(tmp_path):
    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["sink", "local"], ["mixed", "mixed"]]
    path = profile_with_locality(model, tmp_path, roles, [[None, NEAR], [FAR, NEAR], [NEAR, FAR]])
    n, ratio = 200, 0.6
    options = {"profile": path, "sinks": 2, "window": 4}  # budgets=coverage, the default
    cache = make_cache(model, "headwise", ratio=ratio, options=options)
    prefill(model, torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0)), cache)
    kept = cache.kept()
    assert kept[0][0] == n and sum(map(sum, kept)) == round((1 - ratio) * n) * 6
    # Near heads stop at sinks + 8 (97% covered: 24 more tokens would add 3%); the far heads, which cover only
    # 30% with 32 tokens, share the rest evenly.
    assert kept[0][1] == kept[1][1] == kept[2][0] == 2 + 8
    assert kept[1][0] == kept[2][1] == (sum(map(sum, kept)) - n - 3 * 10) // 2
    far_head = cache.compressed_layers[1].heads[0]  # a 'sink' head: sinks + its (long) recent window
    assert far_head.positions[0].tolist() == [0, 1, *range(n - kept[1][0] + 2, n)]
    mixed = cache.compressed_layers[2].heads[1]  # a 'mixed' head ranks by SnapKV: not only a recent window
    assert mixed.positions[0].tolist() != [0, 1, *range(n - kept[2][1] + 2, n)]
    with pytest.raises(HeadwiseError, match="budgets must be"):
        make_cache(model, "headwise", ratio=ratio, options={**options, "budgets": "even"})
    bare = synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]], locality=False)
    with pytest.raises(HeadwiseError, match="locality metrics"):
        make_cache(model, "headwise", ratio=ratio, options={**options, "profile": bare})
    make_cache(model, "headwise", ratio=ratio, options={**options, "profile": bare, "budgets": "roles"})


def test_a_profile_with_unknown_roles_or_layer_types_is_refused(tmp_path):
    model = tiny_model("llama")
    path = synthetic_profile(model, tmp_path, [["retreival", "mixed"], ["mixed", "mixed"], ["mixed", "mixed"]],
                             [[0.0, 0.0]] * 3)
    with pytest.raises(HeadwiseError, match=r"unknown role\(s\) retreival; known: retrieval"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": path})
    data = json.loads((tmp_path / "profile.json").read_text().replace("retreival", "retrieval"))
    data["layer_types"][1] = "chunked_attention"
    (tmp_path / "profile.json").write_text(json.dumps(data))
    with pytest.raises(HeadwiseError, match=r"unknown layer type\(s\) chunked_attention"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": path})


def test_a_profile_of_another_model_is_refused_even_with_the_same_shape(tmp_path):
    model = tiny_model("llama")
    path = synthetic_profile(model, tmp_path, [["mixed", "mixed"]] * 3, [[0.0, 0.0]] * 3)  # made for "tiny"
    model.config._name_or_path = "/home/me/.cache/headwise/models/tiny"  # how a registry model is named
    make_cache(model, "headwise", ratio=0.5, options={"profile": path})
    model.config._name_or_path = "/home/me/.cache/headwise/models/other-tiny"
    with pytest.raises(HeadwiseError, match="made for model 'tiny' but the model loaded is 'other-tiny'"):
        make_cache(model, "headwise", ratio=0.5, options={"profile": path})


def test_a_profile_with_other_layer_types_is_refused(tmp_path):
    gemma = tiny_model("gemma3")  # 4 layers: sliding, full, sliding, full
    path = synthetic_profile(gemma, tmp_path, [["mixed"]] * 4, [[0.0]] * 4)
    gemma.config.layer_types = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(HeadwiseError, match="layer types"):
        make_cache(gemma, "headwise", ratio=0.5, options={"profile": path})


def test_promote_far_heads_serves_the_farthest_reaching_heads_after_the_retrieval_heads():
    kinds = {(0, 0): "retrieval", (0, 1): "streaming", (1, 0): "other", (1, 1): "other"}
    strength = {(0, 0): 0.3, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 0.0}
    far = {(0, 0): 0.0, (0, 1): 0.5, (1, 0): 0.1, (1, 1): 0.7}
    promoted, order = promote_far_heads(kinds, strength, far, 2)
    assert promoted == {(0, 0): "retrieval", (0, 1): "retrieval", (1, 0): "other", (1, 1): "retrieval"}
    # the profile's retrieval head first, then by far mass
    assert order[(0, 0)] > order[(1, 1)] > order[(0, 1)] and order[(1, 0)] == 0.0
    assert promote_far_heads(kinds, strength, far, 0) == (kinds, strength)
    assert set(promote_far_heads(kinds, strength, far, 10)[0].values()) == {"retrieval"}
    budgets = role_budgets([promoted[k] for k in kinds], [order[k] for k in kinds], 100, 250, 10)
    assert budgets == [100, 40, 10, 100]  # whole in order of service; what is left goes to the next in line


def test_headwise_whole_keeps_more_heads_whole(tmp_path):
    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    path = profile_with_locality(model, tmp_path, roles, [[NEAR, NEAR], [FAR, NEAR], [NEAR, NEAR]])
    n, ratio = 200, 0.6
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))
    for budgets in ("coverage", "roles"):
        cache = make_cache(model, "headwise", ratio=ratio,
                           options={"profile": path, "sinks": 2, "window": 4, "whole": 1, "budgets": budgets})
        prefill(model, ids, cache)
        kept = cache.kept()
        assert kept[0][0] == kept[1][0] == n  # the retrieval head, then the head reaching farthest
        assert sum(map(sum, kept)) == round((1 - ratio) * n) * 6
    with pytest.raises(HeadwiseError, match="whole must be"):
        make_cache(model, "headwise", ratio=ratio, options={"profile": path, "whole": -1})
    bare = synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]], locality=False)
    with pytest.raises(HeadwiseError, match="locality metrics"):
        make_cache(model, "headwise", ratio=ratio, options={"profile": bare, "budgets": "roles", "whole": 2})


@pytest.mark.parametrize("seed", range(20))
def test_role_budgets_with_a_cap_serve_retrieval_heads_up_to_it_then_the_others(seed):
    rng = random.Random(seed)
    heads, kinds, strength = random_heads(rng, 10)
    n, floor = rng.randrange(10, 300), rng.randrange(0, 10)
    cap = rng.randrange(floor, n + 1)
    total = rng.randrange(0, heads * n + 50)
    curves = [concave_curve(rng, n) for _ in range(heads)] if rng.random() < 0.5 else None
    counts = role_budgets(kinds, strength, n, total, floor, curves, cap)
    assert sum(counts) == min(total, heads * n) and all(0 <= c <= n for c in counts)
    retrieval = [i for i, k in enumerate(kinds) if k == "retrieval"]
    others = [i for i, k in enumerate(kinds) if k != "retrieval"]
    if any(counts[i] > max(floor, cap) for i in retrieval):  # past the cap only when the others are full
        assert all(counts[i] == n for i in others)
    if heads * min(floor, n) < min(total, heads * n) and any(counts[i] > floor for i in others):
        assert all(counts[i] >= min(cap, n) for i in retrieval)  # the others grow once retrieval heads reach the cap


def test_retrieval_keep_caps_the_retrieval_head_and_gives_the_rest_to_the_others(tmp_path):
    model = tiny_model("llama")  # 3 layers x 2 KV heads
    roles = [["retrieval", "local"], ["mixed", "local"], ["sink", "mixed"]]
    path = synthetic_profile(model, tmp_path, roles, [[0.6, 0.0], [0.0, 0.0], [0.0, 0.05]])
    n, ratio = 200, 0.6
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))
    options = {"profile": path, "sinks": 2, "window": 4, "budgets": "roles"}
    kept = {}
    for keep in (1.0, 0.25):
        cache = make_cache(model, "headwise", ratio=ratio, options={**options, "retrieval_keep": keep})
        prefill(model, ids, cache)
        kept[keep] = cache.kept()
    assert kept[1.0][0][0] == n and kept[0.25][0][0] == 50
    assert kept[0.25][1][0] > kept[1.0][1][0]  # the mixed heads get what the retrieval head no longer takes
    with pytest.raises(HeadwiseError, match="retrieval_keep"):
        make_cache(model, "headwise", ratio=ratio, options={**options, "retrieval_keep": 0})
