"""Each policy's score and each budget function against a naive reference on random tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from headwise.budgets import adaptive_counts, keep_count, layer_fractions
from headwise.errors import HeadwiseError
from headwise.policies import POLICIES, make_policy

B, H, Q, N, D = 2, 3, 5, 17, 8


def random_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, N, D, generator=g)
    values = torch.randn(B, H, N, D, generator=g)
    attn = torch.rand(B, H, Q, N, generator=g).softmax(-1)
    positions = torch.arange(N).expand(B, H, N)
    return keys, values, attn, positions


def naive_pool(row: list[float], kernel: int) -> list[float]:
    """Average over a centred window, zeros beyond the ends counted (SnapKV's pooling)."""
    half = kernel // 2
    return [sum(row[max(0, i - half) : i + half + 1]) / kernel for i in range(len(row))]


def reference_scores(name: str, keys, attn, positions, **opts) -> torch.Tensor:
    """Scores written the slow, obvious way, one (batch, head, token) at a time."""
    ref = torch.zeros(B, H, N)
    for b in range(B):
        for h in range(H):
            if name == "knorm":
                ref[b, h] = torch.tensor([-math.sqrt(sum(float(x) ** 2 for x in keys[b, h, j])) for j in range(N)])
            elif name == "keydiff":  # minus the cosine to the mean of the unit keys
                unit = [[float(x) / math.sqrt(sum(float(y) ** 2 for y in keys[b, h, j])) for x in keys[b, h, j]]
                        for j in range(N)]
                mean = [sum(u[i] for u in unit) / N for i in range(len(unit[0]))]
                norm = math.sqrt(sum(m * m for m in mean))
                ref[b, h] = torch.tensor([-sum(a * m for a, m in zip(u, mean, strict=True)) / norm for u in unit])
            elif name == "streaming_llm":
                ref[b, h] = positions[b, h].float()
            elif name == "h2o":
                ref[b, h] = torch.tensor([sum(float(attn[b, h, i, j]) for i in range(Q)) for j in range(N)])
            elif name == "a2sf":
                lam = opts["forgetting"]
                for j in range(N):
                    s = 0.0
                    for i in range(Q):
                        s = lam * s + float(attn[b, h, i, j])
                    ref[b, h, j] = s
            elif name == "tova":
                ref[b, h] = attn[b, h, Q - 1]
            elif name == "snapkv":  # pooled over the prefix only; the observation window is always kept
                w, k = opts["window"], opts["kernel"]
                mean = [sum(float(attn[b, h, i, j]) for i in range(Q - w, Q)) / w for j in range(N - w)]
                ref[b, h] = torch.tensor(naive_pool(mean, k) + [math.inf] * w)
    return ref


CASES = [
    ("knorm", {}),
    ("keydiff", {}),
    ("streaming_llm", {}),
    ("h2o", {}),
    ("a2sf", {"forgetting": 0.7}),
    ("tova", {}),
    ("snapkv", {"window": 3, "kernel": 5}),
]


@pytest.mark.parametrize(("name", "opts"), CASES)
def test_score_matches_naive_reference(name, opts):
    keys, values, attn, positions = random_inputs()
    policy = make_policy(name, opts)
    state = torch.zeros(B, H, N)
    if policy.queries_needed() != 0:
        needed = policy.queries_needed()
        rows = attn if needed is None else attn[:, :, -needed:]
        state = policy.accumulate(state, rows)
    got = policy.score(keys, values, state, positions)
    torch.testing.assert_close(got, reference_scores(name, keys, attn, positions, **opts), rtol=1e-5, atol=1e-6)


def test_snapkv_prefix_scores_ignore_the_attention_paid_to_the_window():
    """The window's queries vote for the prefix only: what they pay to the window's own tokens changes nothing."""
    keys, values, attn, positions = random_inputs(2)
    policy = make_policy("snapkv", {"window": 3, "kernel": 5})
    louder = attn.clone()
    louder[..., N - 3 :] *= 10
    got = [policy.score(keys, values, policy.accumulate(torch.zeros(B, H, N), a[:, :, -3:]), positions) for a in
           (attn, louder)]
    torch.testing.assert_close(got[0][..., : N - 3], got[1][..., : N - 3])
    assert torch.isinf(got[0][..., N - 3 :]).all()


@pytest.mark.parametrize("name", ["h2o", "a2sf"])
def test_accumulation_in_blocks_equals_one_pass(name):
    """The cache feeds attention in query blocks; the running state must not depend on the split."""
    _, _, attn, _ = random_inputs(1)
    policy = make_policy(name)
    whole = policy.accumulate(torch.zeros(B, H, N), attn)
    split = policy.accumulate(policy.accumulate(torch.zeros(B, H, N), attn[:, :, :2]), attn[:, :, 2:])
    torch.testing.assert_close(whole, split)


def test_random_is_reproducible():
    keys, values, _, positions = random_inputs()
    a = make_policy("random", {"seed": 3}).score(keys, values, torch.zeros(B, H, N), positions)
    b = make_policy("random", {"seed": 3}).score(keys, values, torch.zeros(B, H, N), positions)
    c = make_policy("random", {"seed": 4}).score(keys, values, torch.zeros(B, H, N), positions)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_registry_and_option_errors():
    assert {"full", "random", "streaming_llm", "h2o", "a2sf", "snapkv", "tova", "knorm", "keydiff",
            "kvzip"} <= set(POLICIES)
    with pytest.raises(HeadwiseError, match="unknown policy"):
        make_policy("nope")
    with pytest.raises(HeadwiseError, match="unknown option"):
        make_policy("snapkv", {"bogus": 1})
    with pytest.raises(HeadwiseError, match="kernel"):
        make_policy("snapkv", {"kernel": 4})
    with pytest.raises(HeadwiseError, match="forgetting"):
        make_policy("a2sf", {"forgetting": 1.5})


def test_keep_count():
    assert keep_count(100, ratio=0.75) == 25
    assert keep_count(100, ratio=0.0) == 100
    assert keep_count(100, budget=30) == 30
    assert keep_count(10, budget=30) == 10
    with pytest.raises(ValueError):
        keep_count(10)


@pytest.mark.parametrize("layers", [1, 2, 7, 30])
def test_layer_fractions_average_one_and_shrink_with_depth(layers):
    uniform = layer_fractions(layers)
    pyramid = layer_fractions(layers, "pyramid", slope=0.4)
    assert uniform == [1.0] * layers
    assert sum(pyramid) / layers == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(pyramid))


def naive_adaptive(scores: list[torch.Tensor], total: int, floor: int) -> list[int]:
    counts = [min(floor, s.numel()) for s in scores]
    candidates = []
    for h, s in enumerate(scores):
        ordered = sorted(s.tolist(), reverse=True)
        candidates += [(v, h) for v in ordered[counts[h] :]]
    candidates.sort(key=lambda c: -c[0])
    for _, h in candidates[: max(0, min(total, sum(s.numel() for s in scores)) - sum(counts))]:
        counts[h] += 1
    return counts


@pytest.mark.parametrize("seed", range(5))
def test_adaptive_counts_match_naive_top_k(seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(n, generator=g) ** (h + 1) for h, n in enumerate((20, 31, 12, 25))]
    total, floor = 40, 4
    counts = adaptive_counts(scores, total, floor)
    assert counts == naive_adaptive(scores, total, floor)
    assert sum(counts) == total and min(counts) >= floor


def test_adaptive_counts_when_floors_exceed_budget():
    scores = [torch.rand(10) for _ in range(3)]
    counts = adaptive_counts(scores, 5, floor=4)
    assert sum(counts) == 5 and max(counts) - min(counts) <= 1
