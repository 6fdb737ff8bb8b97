"""The block-wise capture against a dense naive reference built from eager attention weights."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from headwise.capture import CaptureSettings, capture, induction_targets
from headwise.compat import forward

SETTINGS = CaptureSettings(windows=(4, 8), n_sink=2, map_size=8, block_size=7)


def dense_attention(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Full softmax matrices ``[heads, n, n]`` per layer from transformers' eager attention."""
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=ids, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a[0].double() for a in out.attentions]


def allowed_matrix(model, layer: int, n: int) -> torch.Tensor:
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    ok = k <= q
    if getattr(model.config, "layer_types", None) and model.config.layer_types[layer] == "sliding_attention":
        ok &= q - k < model.config.sliding_window
    return ok


def naive_stats(a: torch.Tensor, allowed: torch.Tensor, ids: list[int], cfg: CaptureSettings) -> dict:
    """Every statistic from the dense matrix with plain loops."""
    heads, n, _ = a.shape
    out: dict = {"received": a.sum(1) / allowed.sum(0).clamp(min=1)}
    ent = torch.zeros(heads, dtype=torch.float64)
    for h in range(heads):
        for q in range(n):
            ent[h] -= sum(float(p) * math.log(float(p)) for p in a[h, q] if p > 0)
    out["entropy"] = ent / n
    out["prev"] = torch.stack([a[:, q, q - 1] for q in range(1, n)], 1).mean(1)
    pairs = []
    for q in range(n):
        earlier = [j for j in range(q) if ids[j] == ids[q]]
        if earlier:
            pairs.append((q, earlier[-1] + 1))
    out["induction"] = torch.stack([a[:, q, t] for q, t in pairs], 1).mean(1) if pairs else None
    local = torch.full((heads, len(cfg.windows)), float("nan"), dtype=torch.float64)
    for i, w in enumerate(cfg.windows):
        rows = []
        for q in range(w + cfg.n_sink, n):
            keys = [k for k in range(q + 1) if k < cfg.n_sink or q - k < w]
            rows.append(a[:, q, keys].sum(-1))
        if rows:
            local[:, i] = torch.stack(rows, 1).mean(1)
    out["locality"] = local
    out["argmax"] = a.argmax(-1)
    s = cfg.map_size
    grid = torch.zeros(heads, s, s, dtype=torch.float64)
    for qb in range(s):
        qs = [q for q in range(n) if q * s // n == qb]
        for kb in range(s):
            ks = [k for k in range(n) if k * s // n == kb]
            if qs and ks:
                grid[:, qb, kb] = a[:, qs][:, :, ks].sum(-1).mean(-1)
    out["map"] = grid
    return out


def assert_argmax_close(got: torch.Tensor, a: torch.Tensor) -> None:
    """Argmax equal, except where the two candidates are tied to rounding."""
    want = a.argmax(-1)
    diff = got.long() != want
    if diff.any():
        picked = a.gather(-1, got.long()[..., None])[..., 0]
        best = a.gather(-1, want[..., None])[..., 0]
        assert torch.allclose(picked[diff], best[diff], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_capture_matches_dense_reference(arch):
    model = tiny_model(arch)
    torch.manual_seed(1)
    half = torch.randint(0, 128, (20,))
    ids = torch.cat([torch.tensor([1]), half, half])[None]
    n = ids.shape[1]
    with torch.no_grad():
        dense = dense_attention(model, ids)
        plain = model(input_ids=ids).logits
        with capture(model, SETTINGS) as rec:
            rec.set_input(ids[0])
            captured = model(input_ids=ids).logits
    torch.testing.assert_close(captured, plain, rtol=0, atol=0)
    assert sorted(rec.layers) == list(range(len(dense)))
    for layer, a in enumerate(dense):
        ref = naive_stats(a, allowed_matrix(model, layer, n), ids[0].tolist(), SETTINGS)
        st = rec.layers[layer]
        tol = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.received_mean(), ref["received"], **tol)
        torch.testing.assert_close(st.entropy(), ref["entropy"], **tol)
        torch.testing.assert_close(st.previous_token(), ref["prev"], **tol)
        torch.testing.assert_close(st.induction(), ref["induction"], **tol)
        torch.testing.assert_close(st.locality(), ref["locality"], equal_nan=True, **tol)
        torch.testing.assert_close(st.attention_map(), ref["map"], **tol)
        assert_argmax_close(torch.cat(st.argmax, 1), a)


def test_capture_with_cache_prefix_and_decoding_matches_one_pass():
    """Prefill a prefix, then a chunk, then single tokens: the sums equal those of one dense pass."""
    model = tiny_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 36))
    with torch.no_grad():
        dense = dense_attention(model, ids)
        cache = DynamicCache(config=model.config)
        with capture(model, SETTINGS) as rec:
            rec.set_input(ids[0])
            forward(model, cache, ids[:, :20])
            forward(model, cache, ids[:, 20:30])
            for i in range(30, 36):
                forward(model, cache, ids[:, i : i + 1])
    for layer, a in enumerate(dense):
        ref = naive_stats(a, allowed_matrix(model, layer, 36), ids[0].tolist(), SETTINGS)
        st = rec.layers[layer]
        torch.testing.assert_close(st.received_mean(), ref["received"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.locality(), ref["locality"], equal_nan=True, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.entropy(), ref["entropy"], rtol=1e-5, atol=1e-6)
        assert [t.shape[1] for t in st.argmax] == [7, 7, 6, 7, 3, 1, 1, 1, 1, 1, 1]
        assert_argmax_close(torch.cat(st.argmax, 1), a)


def test_capture_leaves_plain_attention_after_an_error():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
    with pytest.raises(RuntimeError), capture(model):
        raise RuntimeError("boom")
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before)


def test_capture_rejects_batches():
    from headwise.errors import HeadwiseError

    model = tiny_model("llama")
    with pytest.raises(HeadwiseError, match="batch size 1"), capture(model):
        model(input_ids=torch.zeros(2, 5, dtype=torch.long))


def test_induction_targets():
    assert induction_targets(torch.tensor([5, 6, 7, 5, 6, 5])).tolist() == [-1, -1, -1, 1, 2, 4]


def test_argmax_only_keeps_just_the_argmax():
    model = tiny_model("qwen3")
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        a = dense_attention(model, ids)
        with capture(model, CaptureSettings(argmax_only=True, block_size=8)) as rec:
            model(input_ids=ids)
    for layer, st in rec.layers.items():
        assert_argmax_close(torch.cat(st.argmax, 1), a[layer])
        assert st.queries == 0 and st.received.numel() == 0


def test_sliding_cache_layers_report_offsets_that_map_back_to_positions():
    """Gemma 3 sliding layers keep only the last keys in the cache: argmax + (length - key_len) is the position."""
    model = tiny_model("gemma3")
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        dense = dense_attention(model, ids)
        cache = DynamicCache(config=model.config)
        forward(model, cache, ids[:, :33])
        with capture(model, CaptureSettings(argmax_only=True)) as rec:
            for i in range(33, 40):
                forward(model, cache, ids[:, i : i + 1])
    for layer, st in rec.layers.items():
        shifts = torch.tensor([i + 1 - n for i, n in zip(range(33, 40), st.key_lengths, strict=True)])
        if model.config.layer_types[layer] == "sliding_attention":
            assert (shifts > 0).all()
        got = torch.cat(st.argmax, 1) + shifts
        assert_argmax_close(got, dense[layer][:, 33:])
