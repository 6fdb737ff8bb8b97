"""Attribution (headwise.explain.rollout): rollout and flow against naive references, the capture on tiny models,
the HTML page's escaping and the ``headwise attribute`` command line."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import headwise.models
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.explain.attribution_page import attribution_page
from headwise.explain.rollout import (
    FLOW_MAX_TOKENS,
    Attribution,
    LayerQK,
    attention_flow,
    attribute,
    capture_qk,
    capturing,
    head_mean_attention,
    layer_attention_rows,
    mask_window,
    rollout,
    rollout_step,
)
from profile_helpers import tiny_loaded


def naive_attention(q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """The full ``n x n`` head-averaged causal attention, keys repeated per query head."""
    n = q.shape[1]
    keys = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = q @ keys.transpose(1, 2) * scale
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) & (j > i - window) if window is not None else j <= i
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).mean(0)


def naive_rollout(layers: list[LayerQK], targets: list[int]) -> torch.Tensor:
    """The targets' mean row of ``W_L @ ... @ W_1``, ``W_l = 0.5 * A_l + 0.5 * I``, built in full."""
    n = layers[0].key.shape[1]
    product = torch.eye(n, dtype=torch.float64)
    for layer in layers:
        w = 0.5 * naive_attention(layer.query.double(), layer.key.double(), layer.scale, layer.window) \
            + 0.5 * torch.eye(n, dtype=torch.float64)
        product = w @ product
    return product[targets].mean(0)


def random_layers(n: int, count: int, heads: int = 6, kv_heads: int = 2, windows=(None,)) -> list[LayerQK]:
    g = torch.Generator().manual_seed(n * 31 + count)
    return [LayerQK(torch.randn(heads, n, 8, generator=g) * 2, torch.randn(kv_heads, n, 8, generator=g) * 2,
                    8**-0.5, windows[i % len(windows)]) for i in range(count)]


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("block", [1, 4, 100])
def test_layer_attention_rows_matches_the_full_matrix(window, block):
    (layer,) = random_layers(23, 1)
    r = torch.rand(23, generator=torch.Generator().manual_seed(1))
    r[[3, 10]] = 0.0  # rows with no weight are skipped
    expected = r @ naive_attention(layer.query, layer.key, layer.scale, window)
    got = layer_attention_rows(r, layer.query, layer.key, layer.scale, window, block)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_head_mean_attention_keeps_only_the_visible_keys():
    (layer,) = random_layers(20, 1)
    positions = torch.tensor([12, 13, 15])
    rows, lo = head_mean_attention(layer.query, layer.key, layer.scale, positions, window=4)
    assert lo == 9 and rows.shape == (3, 7)  # keys 9..15: the window of query 12 up to query 15
    full = naive_attention(layer.query, layer.key, layer.scale, 4)[positions]
    torch.testing.assert_close(rows, full[:, 9:16])
    assert torch.count_nonzero(full[:, :9]) == 0


def test_rollout_step_adds_the_residual_and_renormalises():
    r, rows = torch.tensor([0.0, 0.5, 0.5]), torch.tensor([0.6, 0.4, 0.0])
    torch.testing.assert_close(rollout_step(r, rows), torch.tensor([0.3, 0.45, 0.25]))


@pytest.mark.parametrize("targets", [None, [7], [9, 11, 14]])
def test_rollout_matches_the_product_of_residual_matrices(targets):
    layers = random_layers(15, 4, windows=(None, 4))
    got = rollout(layers, targets, block=3)
    expected = naive_rollout(layers, targets or [14])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert got.sum().item() == pytest.approx(1.0)
    if targets == [7]:
        assert torch.count_nonzero(got[8:]) == 0  # causal: nothing after the target


def uniform_layers(n: int, count: int) -> list[LayerQK]:
    """Layers whose queries are zero: each position attends uniformly to itself and every earlier position."""
    return [LayerQK(torch.zeros(1, n, 4), torch.randn(1, n, 4), 1.0) for _ in range(count)]


def test_attention_flow_on_a_hand_checked_graph():
    # W = 0.5 * A + 0.5 * I = [[1, 0, 0], [1/4, 3/4, 0], [1/6, 1/6, 2/3]] in both layers. From the top of token 2,
    # edge-disjoint paths reach token 0 through each middle node (min(1/6, 1) + min(1/6, 1/4) + min(2/3, 1/6)),
    # token 1 through the middle nodes 1 and 2 (1/6 + 1/6), token 2 through middle node 2 only (2/3).
    flows = attention_flow(uniform_layers(3, 2))
    torch.testing.assert_close(flows, torch.tensor([1 / 2, 1 / 3, 2 / 3]), atol=1e-5, rtol=0)
    one = attention_flow(uniform_layers(3, 1), targets=[1])
    torch.testing.assert_close(one, torch.tensor([1 / 4, 3 / 4, 0.0]), atol=1e-5, rtol=0)
    # Two targets: the source feeds each with 1/2, so token 1 gets min(1/2, 3/4) + min(1/2, 1/6).
    two = attention_flow(uniform_layers(3, 1), targets=[1, 2])
    torch.testing.assert_close(two, torch.tensor([1 / 4 + 1 / 6, 1 / 2 + 1 / 6, 1 / 2]), atol=1e-5, rtol=0)


def test_attention_flow_refuses_long_inputs():
    with pytest.raises(HeadwiseError, match="use rollout"):
        attention_flow(uniform_layers(FLOW_MAX_TOKENS + 1, 1))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_capture_reproduces_the_models_attention(arch):
    lm = tiny_loaded(arch)
    ids = torch.randint(2, 120, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        reference = lm.model(torch.tensor([ids]), use_cache=False).logits
        with capturing(lm.model) as captured:
            captured_logits = lm.model(torch.tensor([ids]), use_cache=False).logits
    torch.testing.assert_close(captured_logits, reference)  # the capture returns SDPA's output
    assert sorted(captured) == list(range(lm.model.config.num_hidden_layers))
    layers = capture_qk(lm.model, ids, half=False)
    if arch == "gemma3":
        assert [layer.window for layer in layers] == [16, None, 16, None]  # sliding layers keep their window
    lm.model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = lm.model(torch.tensor([ids]), use_cache=False, output_attentions=True, logits_to_keep=1).attentions
    for layer, weights in zip(layers, eager, strict=True):
        got, _ = head_mean_attention(layer.query, layer.key, layer.scale, torch.arange(40), layer.window)
        torch.testing.assert_close(got, weights[0].mean(0), rtol=1e-4, atol=1e-6)
    half = capture_qk(lm.model, ids)
    assert half[0].query.dtype == torch.float16
    torch.testing.assert_close(rollout(half), rollout(layers), rtol=1e-2, atol=1e-4)


def test_mask_window_refuses_a_mask_that_is_not_causal():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    assert mask_window(None, 6, 2) is None and mask_window(causal, 6, 2) is None
    assert mask_window(causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3), 6, 4) == 3
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert mask_window(additive, 6, 4) is None
    padded = causal.clone()
    padded[..., 0] = False
    with pytest.raises(HeadwiseError, match="causal attention mask"):
        mask_window(padded, 6, 4)


def test_attribute_targets_the_positions_that_predicted_the_answer():
    lm = tiny_loaded("llama")
    prompt, answer = list(range(10, 30)), [40, 41, 42]
    result = attribute(lm, prompt, answer)
    assert result.targets == [19, 20, 21] and len(result.relevance) == len(result.tokens) == 20
    assert sum(result.relevance) + result.answer_share == pytest.approx(1.0)
    assert attribute(lm, prompt, [40]).relevance == pytest.approx(attribute(lm, prompt).relevance)
    flow = attribute(lm, prompt, answer, method="flow")
    assert flow.method == "flow" and max(flow.relevance) <= 1.0
    with pytest.raises(HeadwiseError, match="unknown attribution method"):
        attribute(lm, prompt, method="saliency")
    with pytest.raises(HeadwiseError, match="use rollout"):
        attribute(lm, list(range(2, 2 + FLOW_MAX_TOKENS + 1)), method="flow")
    with pytest.raises(HeadwiseError, match="context"):
        attribute(lm, [5] * 600)


def test_the_capture_function_is_registered_publicly():
    assert "headwise_rollout" in AttentionInterface()


def test_the_page_escapes_every_token_and_needs_nothing_from_outside():
    tokens = ["<s>", "The", " key", " <script>alert(1)</script>", " is", " 7", "\n", "&amp;"]
    relevance = [0.6, 0.01, 0.05, 0.2, 0.02, 0.1, 0.01, 0.01]
    html = attribution_page(Attribution("m<b>", "rollout", tokens, relevance, "7 <i>", [7], 0.0, 0.5),
                            note="generated with <cache>")
    assert "<script" not in html and "<i>" not in html and "<b>" not in html and "<cache>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&amp;amp;" in html
    assert 'title="position 3: 0.2"' in html and "http" not in html.replace("data:image/png", "")
    assert "rgba(230, 120, 0, 1.000)" in html  # the first token (a sink) is clipped at full colour
    assert html.index("&lt;script&gt;alert") < html.index("Most relevant") < html.index("[ &lt;script&gt;alert")


@pytest.fixture
def tiny_cli(monkeypatch, capsys):
    """Run ``headwise attribute ...`` on the tiny llama (no real model is loaded); returns (code, out, err)."""
    monkeypatch.setattr(headwise.models, "load_model", lambda name, dtype="float32": tiny_loaded("llama"))

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["attribute", *argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.mark.parametrize(("argv", "message"), [
    (["--file", "/nonexistent/prompt.txt"], "cannot read prompt file"),
    (["hi", "--ratio", "0.5"], "--ratio would be ignored"),
    (["hi", "--policy", "snapkv", "--ratio", "0.5", "--answer", "x"], "give one of them"),
    (["hi", "--policy", "snapkv", "--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["hi", "-n", "0"], "--max-new-tokens must be at least 1"),
])
def test_attribute_refuses_bad_input_before_loading(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(headwise.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["attribute", *argv, "--out", str(tmp_path / "page.html")]) == 2
    assert message in capsys.readouterr().err
    assert main(["attribute", "hi", "--out", str(tmp_path)]) == 2
    assert "is an existing folder" in capsys.readouterr().err


def test_attribute_refuses_what_the_model_cannot_take(tiny_cli, tmp_path):
    out = str(tmp_path / "page.html")
    code, _, err = tiny_cli("ab" * 300, "--out", out)
    assert code == 2 and "--truncate" in err  # the tiny model's context is 512 tokens
    code, _, err = tiny_cli("ab" * 50, "--method", "flow", "-n", "30", "--out", out)
    assert code == 2 and "at most 128 tokens" in err and "--max-new-tokens" in err
    code, _, err = tiny_cli("ab", "--answer", "", "--out", out)
    assert code == 2 and "--answer has no tokens" in err


def test_attribute_writes_the_page_for_a_generated_or_given_answer(tiny_cli, tmp_path):
    out = tmp_path / "page.html"
    code, text, err = tiny_cli("key: value " * 10, "--policy", "streaming_llm", "--budget", "40", "-n", "3",
                               "--out", str(out))
    assert code == 0 and "streaming_llm, budget 40" in text and str(out) in err
    assert "&lt;script&gt;" in out.read_text() and "<script" not in out.read_text()  # ':' is '<script>' here
    code, text, _ = tiny_cli("key: value " * 4, "--answer", "ok", "--method", "flow", "--top", "3", "--out", str(out))
    assert code == 0 and "answer: ok" in text and "flow over 45 prompt tokens" in text
    assert len(text.splitlines()) == 2 + 3


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(scope="module")
def passkey_attribution(smollm2):
    """SmolLM2's rollout of its passkey answer (teacher-forced) over a 253-token chat prompt, and the needle's
    digit positions."""
    from headwise.generation import build_prompt

    text = (PASSKEY_FILLER * 4 + "The pass key is 71432. Remember it. 71432 is the pass key. " + PASSKEY_FILLER * 4
            + "What is the pass key?")
    ids = build_prompt(smollm2, text)
    answer = smollm2.tokenizer("The pass key is 71432.", add_special_tokens=False)["input_ids"]
    result = attribute(smollm2, ids, answer)
    needle = [i for i, t in enumerate(result.tokens) if t in set("71432")]
    return ids, result, needle


@pytest.mark.slow
def test_rollout_on_smollm2_keeps_every_token_and_the_mass(smollm2, passkey_attribution):
    ids, result, needle = passkey_attribution
    assert "".join(result.tokens) == smollm2.tokenizer.decode(ids) and len(needle) == 10
    assert sum(result.relevance) + result.answer_share == pytest.approx(1.0, abs=1e-4)
    assert result.top(1) == [0]  # the attention sink, where rollout's mass drifts over 30 causal layers


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="rollout (residual weight 0.5, as in the paper) drifts to the first tokens on "
                   "SmolLM2's 30 layers: the needle's digits rank 112th to 143rd of 253 tokens")
def test_rollout_on_smollm2_finds_the_needle(passkey_attribution):
    _, result, needle = passkey_attribution
    assert set(needle) & set(result.top(10))
