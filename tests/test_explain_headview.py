"""Head views: the maths against naive references, the model adapter on tiny models, the page, the CLI."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import headwise.attention
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.explain.headview import (
    allowed_keys,
    attention_rows,
    balance_queries_keys,
    check_positions,
    default_query_positions,
    head_view,
    joint_pca,
    long_range_mass,
    point_positions,
)
from headwise.explain.headview_page import point_bytes, render_page, row_bytes, view_data
from headwise.profile.data import prose_ids
from profile_helpers import tiny_loaded


def random_qk(n: int = 50, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 0.7, torch.randn(n, d, generator=g) * 3 - 1.5


def eager_rows(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's full attention matrix ``[heads, n, n]`` from transformers' eager attention."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids[None], output_attentions=True)
    finally:
        model.set_attn_implementation(headwise.attention.NAME)
    return [a[0] for a in out.attentions]


# --- pure functions ------------------------------------------------------------------------------------------------

def test_balance_matches_centroids_and_norms_and_keeps_every_softmax_row():
    q, k = random_qk()
    bq, bk = balance_queries_keys(q, k)
    torch.testing.assert_close(bq.mean(0), bk.mean(0))
    torch.testing.assert_close(bq.norm(dim=1).mean(), bk.norm(dim=1).mean())
    logits, balanced = (q @ k.T).double(), bq @ bk.T
    shift = balanced - logits  # a constant per query row
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), atol=1e-5, rtol=0)
    torch.testing.assert_close(balanced.softmax(-1), logits.softmax(-1), atol=1e-6, rtol=0)


def test_joint_pca_matches_an_svd_reference():
    q, k = random_qk()
    positions = [0, 7, 20, 49]
    got = joint_pca(q, k, positions)
    bq, bk = (t.numpy() for t in balance_queries_keys(q, k))
    joint = np.concatenate([bq, bk])
    centre = joint.mean(0)
    _, s, vt = np.linalg.svd(joint - centre, full_matrices=False)
    for c in range(2):  # components are defined up to sign: align the reference's
        axis = vt[c] * np.sign(vt[c][np.abs(vt[c]).argmax()])
        np.testing.assert_allclose(got.queries[:, c].numpy(), (bq[positions] - centre) @ axis, atol=1e-5)
        np.testing.assert_allclose(got.keys[:, c].numpy(), (bk[positions] - centre) @ axis, atol=1e-5)
    np.testing.assert_allclose(got.explained.numpy(), (s**2 / (s**2).sum())[:2], atol=1e-6)
    assert got.explained[0] >= got.explained[1] > 0


def test_joint_pca_is_invariant_to_changes_that_keep_the_attention():
    """Keys moved by a constant, queries scaled by s and keys by 1 / s: the same attention, the same picture."""
    q, k = random_qk(seed=3)
    shift = torch.randn(k.shape[1])
    a, b = joint_pca(q, k, range(50)), joint_pca(q * 2.5, k / 2.5 + shift, range(50))
    torch.testing.assert_close(b.queries, a.queries, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.keys, a.keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.explained, a.explained)


def test_degenerate_inputs_keep_their_scale():
    q = torch.ones(6, 4)
    _, k = random_qk(6, 4)
    bq, _ = balance_queries_keys(q, k)  # all queries equal: no balancing scale exists
    torch.testing.assert_close(bq, q.double())
    assert torch.isfinite(joint_pca(q, torch.ones(6, 4) * 2, range(6)).queries).all()


def naive_rows(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, positions: list[int], scale: float):
    """Whole ``n x n`` attention per head with loops over heads (GQA by index), then the chosen rows."""
    heads, group = q.shape[0], q.shape[0] // k.shape[0]
    out = []
    for h in range(heads):
        full = (q[h] @ k[h // group].T * scale).masked_fill(~allowed, float("-inf"))
        out.append(torch.softmax(full, -1)[positions])
    return torch.stack(out)


@pytest.mark.parametrize("window", [None, 5])
def test_attention_rows_match_the_full_matrix_in_blocks(window):
    n, positions = 24, [0, 3, 11, 12, 23]
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, n, 8, generator=g), torch.randn(2, n, 8, generator=g)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
    mask = None if window is None else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    where = torch.tensor(positions)
    rows = attention_rows(q, k, allowed_keys(mask, where, n), where, 0.3, block_elements=6 * n * 2)  # 2 rows a block
    torch.testing.assert_close(rows, naive_rows(q, k, allowed, positions, 0.3))
    assert rows[:, 1, 4:].abs().max() == 0  # nothing after the query
    if window is not None:
        assert rows[:, 4, : 23 - window + 1].abs().max() == 0  # nothing before the window
    bool_mask = allowed_keys(allowed[None, None], where, n)
    assert torch.equal(bool_mask, allowed[positions])


def test_positions():
    assert default_query_positions(2048) == [511, 1023, 1535, 2047]
    assert default_query_positions(2) == [0, 1]
    assert check_positions([5, -1, 5, 0], 10) == [0, 5, 9]
    for bad in ([10], [-11]):
        with pytest.raises(HeadwiseError, match="out of range for a text of 10 tokens"):
            check_positions(bad, 10)
    with pytest.raises(HeadwiseError, match="no query position"):
        check_positions([], 10)
    points = point_positions(1000, 20, keep=[3, 999, 500])
    assert len(points) == 20 and {3, 999, 500} <= set(points) and points == sorted(points)
    assert max(b - a for a, b in itertools.pairwise(points)) <= 1000 / 16 + 1  # evenly spread
    assert points == point_positions(1000, 20, keep=[3, 999, 500])
    assert point_positions(5, 100) == [0, 1, 2, 3, 4]
    with pytest.raises(HeadwiseError, match="max_points must be at least 1"):
        point_positions(5, 0)


def test_long_range_mass_against_loops():
    rows = torch.rand(2, 3, 40)
    positions = [10, 35, 39]
    got = long_range_mass(rows, positions, window=8)
    for j, p in enumerate(positions):
        want = sum(rows[:, j, t] for t in range(1, 40) if t <= p - 8)
        torch.testing.assert_close(got[:, j], want)


# --- the model adapter -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
def test_rows_equal_eager_attention(arch):
    """GQA (llama, qwen3 with q/k norms) and sliding-window layers (gemma3, window 16 of 60 tokens)."""
    lm = tiny_loaded(arch)
    ids = torch.randint(2, 128, (60,), generator=torch.Generator().manual_seed(0))
    view = head_view(lm, ids, query_positions=[0, 7, 30, -1], max_points=12)
    eager = eager_rows(lm.model, ids)
    assert view.query_positions == [0, 7, 30, 59] and view.rows.shape == (len(eager), lm.info.num_heads, 4, 60)
    for li, layer in enumerate(view.layers):
        torch.testing.assert_close(view.rows[li], eager[layer][:, view.query_positions], atol=2e-6, rtol=1e-4)
    if arch == "gemma3":
        sliding = [i for i, t in enumerate(lm.info.layer_types) if t == "sliding_attention"]
        assert view.rows[sliding, :, 3, : 60 - 16].abs().max() == 0
    assert len(view.point_positions) == 12 and set(view.query_positions) <= set(view.point_positions)
    assert view.queries_2d.shape == view.keys_2d.shape == (len(eager), lm.info.num_heads, 12, 2)
    assert (view.explained[..., 0] >= view.explained[..., 1]).all()


def test_map_equals_joint_pca_of_the_captured_queries_and_keys(monkeypatch):
    """The adapter hands joint_pca each head's queries and its KV head's keys, as the attention function got them."""
    import headwise.explain.headview as hv

    lm = tiny_loaded("llama")
    ids = torch.randint(2, 128, (30,), generator=torch.Generator().manual_seed(2))
    seen = {}

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = (query[0].clone(), key[0].clone())
        return real(module, query, key, value, attention_mask, **kwargs)

    real = hv.headview_attention
    monkeypatch.setattr(hv, "headview_attention", spy)
    view = head_view(lm, ids, layers=[1], max_points=30)
    q, k = seen[1]
    for h in range(4):
        want = joint_pca(q[h], k[h // 2], view.point_positions)
        torch.testing.assert_close(view.queries_2d[0, h], want.queries)
        torch.testing.assert_close(view.keys_2d[0, h], want.keys)
    assert view.layers == [1] and list(seen) == [0, 1, 2]


def test_the_model_is_left_on_headwise_attention_and_outputs_are_unchanged():
    lm = tiny_loaded("gemma3")
    ids = torch.randint(2, 128, (40,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = lm.model(input_ids=ids[None]).logits[0, -1]
    head_view(lm, ids)
    assert lm.model.config._attn_implementation == "headwise"
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids[None]).logits[0, -1], before)


def test_adapter_refuses_bad_input_before_running():
    lm = tiny_loaded("llama")
    with pytest.raises(HeadwiseError, match="no tokens"):
        head_view(lm, [])
    with pytest.raises(HeadwiseError, match="600 tokens but the model's context is 512"):
        head_view(lm, [5] * 600)
    with pytest.raises(HeadwiseError, match=r"layers must be among 0\.\.2"):
        head_view(lm, [5] * 10, layers=[3])
    with pytest.raises(HeadwiseError, match="out of range"):
        head_view(lm, [5] * 10, query_positions=[10])


def test_a_layer_that_bypasses_the_attention_interface_is_an_error(monkeypatch):
    import headwise.explain.headview as hv

    def plain(module, *args, **kwargs):
        return hv.sdpa_attention()(module, *args, **kwargs)

    monkeypatch.setattr(hv, "headview_attention", plain)
    with pytest.raises(HeadwiseError, match=r"layers \[0, 1, 2\] of tiny-llama never called the attention interface"):
        head_view(tiny_loaded("llama"), [5] * 10)


def test_nothing_quadratic_is_built():
    """Every tensor a torch function returns while the view runs (the model's own included) is far below n x n."""
    lm = tiny_loaded("llama")
    n = 512
    ids = torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(5))
    largest = [0]

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())
            return out

    with Watch():
        head_view(lm, ids, query_positions=list(range(0, n, 64)), max_points=64)
    assert 0 < largest[0] < n * n / 2  # eager attention would build 4 heads x n x n


def test_summary_is_json_with_the_top_keys_in_order():
    lm = tiny_loaded("llama")
    view = head_view(lm, torch.arange(2, 42), query_positions=[5, -1])
    data = json.loads(json.dumps(view.summary(k=3)))
    top = data["top_keys"][2][1][0]
    assert len(top) == 3 and top[0]["attention"] >= top[1]["attention"] >= top[2]["attention"]
    assert all(t["position"] <= 5 for t in top)
    assert len(data["long_range_mass"][0][0]) == 2 and data["query_tokens"][1] == view.tokens[-1]


# --- the page --------------------------------------------------------------------------------------------------------

def test_row_and_point_bytes():
    rows = torch.tensor([[0.9, 0.04, 0.01, 0.05, 0.0]])
    data, peak = row_bytes(rows)
    assert peak.tolist() == pytest.approx([0.05])
    decoded = (torch.tensor(list(data), dtype=torch.float32) / 255) ** 2 * 0.05
    assert data[0] == 255 and data[4] == 0  # the sink saturates; no attention stays blank
    torch.testing.assert_close(decoded[1:], rows[0, 1:], atol=5e-4, rtol=0)
    q = torch.tensor([[[[0.0, 0.0], [2.0, 1.0]]]])
    k = torch.tensor([[[[1.0, 0.5], [1.0, 0.0]]]])
    cells = list(point_bytes(q, k))
    assert cells == [0, 64, 255, 191, 128, 128, 128, 64]  # one square grid: x spans 2, y is centred


def test_page_is_self_contained_and_escapes_tokens():
    lm = tiny_loaded("gemma3")
    view = head_view(lm, prose_ids(lm.tokenizer, 80, 0), max_points=40)
    view.tokens[3] = "</script><script>alert(1)</script>&"
    html = render_page(view, "<file>.txt")
    assert html.count("<script") == 2  # the data block and the page's own script
    assert "alert(1)" in html and "<script>alert(1)" not in html and "&lt;file&gt;.txt" in html
    assert "http://" not in html and "https://" not in html
    data = view_data(view, (0, 0))
    rows = zlib.decompress(base64.b64decode(data["rows"]))
    assert len(rows) == view.rows.numel() and len(data["rowMax"]) == len(data["first"]) == view.rows[..., 0].numel()


def test_profile_report_carries_the_head_view(monkeypatch):
    from headwise.profile import ProfileSettings, profile_model
    from headwise.profile.report import render_html
    from profile_helpers import fake_answer

    lm = tiny_loaded("llama")
    fake_answer(monkeypatch, lm)
    result = profile_model(lm, ProfileSettings(length=96, repeat_length=40, runs=1, sample_tokens=48,
                                               max_new_tokens=4), progress=False)
    view = result.head_view
    assert view.length == 48 and view.tokens == result.sample_tokens and view.query_positions[-1] == 47
    assert view.rows.shape == (3, 4, 4, 48) and "head_view_seconds" in result.timings
    html = render_html(result, {})
    assert 'id="hv-scatter"' in html and '"headView": {' in html and html.count("<script") == 2


# --- the command line -----------------------------------------------------------------------------------------------

def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tiny_cli(monkeypatch):
    """``headwise heads`` on the tiny gemma3 model (context 512) instead of a real one."""
    lm = tiny_loaded("gemma3")
    monkeypatch.setattr("headwise.models.load_model", lambda name, dtype="auto": lm)
    return lm


def test_heads_command_writes_the_page_and_numbers(capsys, tmp_path, tiny_cli):
    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 8)
    code, out, err = run(capsys, "heads", "--file", str(text), "--query", "0,-1", "--max-points", "50",
                         "--layers", "1,3", "--threads", "1", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "tiny-gemma3: 193 tokens, 2 layers x 4 heads, query positions 0, 192" in out
    summary = json.loads((tmp_path / "o" / "heads.json").read_text())
    assert summary["layers"] == [1, 3] and summary["query_positions"] == [0, 192]
    assert (tmp_path / "o" / "heads.html").read_text().count('class="cell"') == 8


@pytest.mark.parametrize(("argv", "message"), [
    (["--query", "1,x"], "--query takes comma-separated integers, got '1,x'"),
    (["--layers", "a"], "--layers takes comma-separated integers"),
    (["--max-points", "0"], "--max-points must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--query", "40"], "query position 40 is out of range for a text of 13 tokens"),
    (["--layers", "4"], "layers must be among 0..3"),
])
def test_heads_command_refuses_bad_arguments(capsys, tmp_path, tiny_cli, argv, message):
    text = tmp_path / "t.txt"
    text.write_text("short text.\n")
    code, _, err = run(capsys, "heads", "--file", str(text), *argv, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_heads_command_refuses_bad_files(capsys, tmp_path, tiny_cli):
    code, _, err = run(capsys, "heads", "--file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "cannot read text file" in err
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert "not UTF-8 text" in run(capsys, "heads", "--file", str(binary), "--out", str(tmp_path / "o"))[2]
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n ")
    assert "is empty" in run(capsys, "heads", "--file", str(blank), "--out", str(tmp_path / "o"))[2]
    long = tmp_path / "long.txt"
    long.write_text("x" * 600)
    code, _, err = run(capsys, "heads", "--file", str(long), "--out", str(tmp_path / "o"))
    assert code == 2 and "601 tokens but the model's context is 512" in err
    a_file = tmp_path / "taken"
    a_file.write_text("")
    code, _, err = run(capsys, "heads", "--file", str(long), "--out", str(a_file))
    assert code == 2 and "is an existing file" in err


def test_heads_help_imports_no_torch():
    code = ("import sys\nfrom headwise.cli import main\ntry:\n    main(['heads', '--help'])\n"
            "except SystemExit:\n    pass\nsys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) or 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "--max-points" in done.stdout


@pytest.mark.slow
def test_smollm2_rows_equal_eager_attention(smollm2):
    ids = torch.tensor(prose_ids(smollm2.tokenizer, 200, 0))
    view = head_view(smollm2, ids, layers=[0, 15, 29], max_points=64)
    eager = eager_rows(smollm2.model, ids)
    for li, layer in enumerate(view.layers):
        torch.testing.assert_close(view.rows[li], eager[layer][:, view.query_positions], atol=1e-4, rtol=1e-3)
    assert view.rows[1:, :, -1, 0].mean() > 0.3  # the first token is a strong sink in most later heads
