"""Benchmark report from part records: the gate, headline means (hand-computed), paired verdicts, per-task and
cost tables, self-contained HTML, Markdown, peers through the CLI."""

from __future__ import annotations

import json
import re

import pytest

from headwise.bench import store
from headwise.bench.store import append_record
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.report.bench_report import (
    PLOTS,
    analyse,
    build_report,
    compare,
    cost_rows,
    harmonize,
    markdown_report,
    markdown_table,
    per_task_table,
    sweep_rows,
    terminal_table,
)

LENGTH = 2048
TASKS = ("passkey", "qa", "vartrack")
CONTEXTS = 8
QUESTIONS = 3


def part(
    library: str,
    method: str,
    ratio: float,
    task: str,
    context: int,
    scores: list[float],
    *,
    seed: int = 0,
    nll_gap: float = 0.0,
    calibration: bool = False,
) -> dict:
    """One cell on one context, with one answer per score (question ``q<i>``)."""
    context_id = f"{task}-{LENGTH}-s{seed}-c{context}"
    samples = [
        {
            "id": f"{context_id}-q{i}",
            "context_id": context_id,
            "depth": 0.5,
            "needle_depth": 0.5,
            "score": s,
            "output": "x",
            "answer_ids": [1],
            "answers": ["x"],
            "prompt_tokens": LENGTH,
            "question_seconds": 0.1,
            "decode_tokens_per_second": 20.0,
            "nll": 1.0 + nll_gap,
            "top1": 1.0 - nll_gap / 2,
            "nll_full": 1.0,
        }
        for i, s in enumerate(scores)
    ]
    cell = f"{library}-{method}-{ratio}-{task}-{seed}"
    return {
        "key": f"{cell}-{context}",
        "cell": cell,
        "library": library,
        "model": "m",
        "method": method,
        "options": {},
        "resolved": {},
        "ratio": ratio,
        "task": task,
        "length": LENGTH,
        "protocol": "agnostic",
        "n_samples": CONTEXTS,
        "seed": seed,
        "chunk_size": None,
        "calibration": calibration,
        "fingerprint": "f00d",
        "context_id": context_id,
        "kv_bytes": (1 - ratio) * 2**20,
        "prefill_seconds": 0.5,
        "compress_seconds": 0.1 if ratio else 0.0,
        "shared_prefill": library == "headwise",
        "peak_rss": 2**30,
        "peak_rss_delta": 2**25,
        "wall_seconds": 3.0,
        "cpu_seconds": 3.0,
        "score": sum(scores) / len(scores),
        "samples": samples,
        "versions": {"torch": "2.13.0"},
        "git_commit": "abc",
        "machine": {"platform": "Linux", "cpu_count": 2},
        "timestamp": "2026-01-01T00:00:00+00:00",
    }


def as_peer(flat: dict) -> dict:
    """The same part in a peer runner's shape: metrics and metadata nested, the method prefixed."""
    metric_names = ("kv_bytes", "prefill_seconds", "compress_seconds", "wall_seconds", "samples", "score")
    metrics = {k: flat[k] for k in metric_names} | {"peak_rss_bytes": flat["peak_rss"]}
    rest = {k: v for k, v in flat.items() if k not in (*metric_names, "peak_rss", "versions", "key", "method")}
    return {
        **rest,
        "score": flat["score"],
        "method": f"kvpress:{flat['method']}",
        "metrics": metrics,
        "metadata": {"versions": {"kvpress": "0.5.5"}},
        "shared_prefill": False,
    }


def scores_of(method: str, task: str, context: int) -> list[float]:
    """Reported scores (varying from context to context): full 1 (vartrack 0.5); snapkv 1 on passkey, 2/3 on qa;
    tova the same but one answer; streaming_llm 1/3 on passkey and 0 on qa."""
    odd = context % 2
    if task == "vartrack":
        return [1.0, 0.0, float(odd)]
    if method == "full":
        return [1.0] * QUESTIONS
    if method == "streaming_llm":
        return ([0.0] * 3 if odd else [1.0, 1.0, 0.0]) if task == "passkey" else [0.0] * QUESTIONS
    scores = [1.0] * QUESTIONS if task == "passkey" else [1.0, 0.0, 0.0] if odd else [1.0] * QUESTIONS
    if method == "tova" and task == "passkey" and context == 0:
        scores[0] = 0.0
    return scores


def synthetic() -> list[dict]:
    rows = []
    for task in TASKS:  # the gate: vartrack fails it (mean 0.5)
        for c in range(4):
            scores = ([1.0, 0.0, 1.0] if c % 2 else [0.0, 1.0, 0.0]) if task == "vartrack" else [1.0] * 3
            rows.append(part("headwise", "full", 0.0, task, c, scores, seed=100, calibration=True))
        for c in range(CONTEXTS):
            rows.append(part("headwise", "full", 0.0, task, c, scores_of("full", task, c)))
            for method, gap in (("snapkv", 0.2), ("tova", 0.25), ("streaming_llm", 1.5)):
                rows.append(part("headwise", method, 0.5, task, c, scores_of(method, task, c), nll_gap=gap))
            rows.append(part("headwise", "<script>x</script>", 0.75, task, c, scores_of("snapkv", task, c)))
            rows.append(as_peer(part("kvpress", "snapkv", 0.5, task, c, scores_of("snapkv", task, c), nll_gap=0.3)))
    return rows


@pytest.fixture
def records() -> list[dict]:
    return [harmonize(store.parse_line(json.dumps(r))) for r in synthetic()]


def lines_by_name(records) -> dict[tuple[str, str], object]:
    _, panels = analyse(records)
    (panel,) = panels
    return {(line.setting[0], line.setting[1]): line for line in panel.lines}


def test_gate_table_and_flags(records):
    gate_result, (panel,) = analyse(records)
    assert gate_result == {
        ("m", "passkey", LENGTH): (1.0, 12, True),
        ("m", "qa", LENGTH): (1.0, 12, True),
        ("m", "vartrack", LENGTH): (0.5, 12, False),
    }
    assert panel.tasks == {"passkey": "pass", "qa": "pass", "vartrack": "beyond the model"}
    text = terminal_table(records)
    assert re.search(r"m\s+vartrack\s+2048\s+0\.500\s+12\s+beyond the model", text)
    headers, rows = per_task_table(panel)
    assert headers == ["method", "ratio", "passkey", "qa", "vartrack (beyond the model)"]
    full = next(row for row in rows if row[0] == "full")
    assert full[2] == "1.000 [1.000, 1.000] (24)" and full[4].startswith("0.500 [")


def test_headline_is_the_mean_of_gate_passing_task_means(records):
    lines = lines_by_name(records)
    snapkv = lines["headwise", "snapkv"]
    assert snapkv.score.mean == pytest.approx((1 + 2 / 3) / 2)  # vartrack left out, each task weighs the same
    assert len(snapkv.rows) == 2 * CONTEXTS * QUESTIONS and snapkv.tasks == 2
    assert lines["headwise", "streaming_llm"].score.mean == pytest.approx((1 / 3 + 0) / 2)
    assert lines["headwise", "tova"].score.mean == pytest.approx((23 / 24 + 2 / 3) / 2)
    assert snapkv.nll_gap.mean == pytest.approx(0.2) and snapkv.top1.mean == pytest.approx(0.9)
    assert lines["headwise", "full"].nll_gap.mean == 0 and lines["headwise", "full"].top1.mean == 1
    for line in lines.values():
        assert line.score.lo <= line.score.mean <= line.score.hi
        assert line.nll_gap.lo <= line.nll_gap.mean <= line.nll_gap.hi
    assert lines["headwise", "snapkv"].score.hi - lines["headwise", "snapkv"].score.lo > 0.05  # qa varies


def test_ahead_only_where_the_paired_interval_excludes_zero(records):
    lines = lines_by_name(records)
    assert lines["headwise", "snapkv"].verdict == "best" and lines["headwise", "snapkv"].versus_best is None
    behind = lines["headwise", "streaming_llm"]
    assert behind.verdict == "behind" and behind.versus_best[0].mean == pytest.approx(-2 / 3)
    assert behind.versus_best[0].hi < 0 and behind.versus_best[1] == 48
    tova = lines["headwise", "tova"]  # one answer in 48 differs: tied, not behind
    assert tova.verdict == "tied" and tova.versus_best[0].mean == pytest.approx(-1 / 48)
    assert tova.versus_best[0].lo < 0 <= tova.versus_best[0].hi
    assert lines["kvpress", "snapkv"].verdict == "tied" and lines["kvpress", "snapkv"].versus_best[0].mean == 0
    assert lines["headwise", "full"].verdict == ""  # alone at ratio 0


def test_paired_comparison_uses_the_common_answers_only(records):
    lines = lines_by_name(records)
    snapkv, streaming = lines["headwise", "snapkv"].rows, lines["headwise", "streaming_llm"].rows
    half = [a for a in streaming if a.task == "passkey"]
    diff, n = compare(half, snapkv)
    assert n == CONTEXTS * QUESTIONS and diff.mean == pytest.approx(1 / 3 - 1)
    assert compare(half, [a for a in snapkv if a.task == "qa"]) is None


def test_costs_and_sweep_wall_time(records):
    _, (panel,) = analyse(records)
    rows = {(row[0], row[1]): row for row in cost_rows(panel)}
    snapkv = rows["snapkv", "0.5"]
    assert snapkv[2:] == ["0.50", "0.50", "0.500", "100.0%", "0.100", "20.0", "1.00", 3 * CONTEXTS, 3 * CONTEXTS]
    assert rows["snapkv (kvpress)", "0.5"][-1] == 0
    sweep = {row[0]: row for row in sweep_rows(records)}
    parts = 3 * 4 + 3 * CONTEXTS * 5  # calibration included
    assert sweep["headwise"] == ["headwise", "m", LENGTH, parts, parts * 3, f"{3.0 * parts:.0f}", "1.00", parts]
    assert sweep["kvpress"][3] == 3 * CONTEXTS and sweep["kvpress"][-1] == 0


def test_markdown_report_has_the_tables(records):
    text = markdown_report(records)
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "### Calibration gate",
        f"### m, {LENGTH} tokens",
        f"#### Per task, m, {LENGTH} tokens",
        f"#### Costs, m, {LENGTH} tokens",
        "### Sweep wall time (sum of part wall seconds, calibration included)",
        "### Provenance",
    ]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| **snapkv** | 0.5 |") and line.endswith("| best |") for line in rows)
    assert any(line.startswith("| tova ≈ | 0.5 |") and line.endswith("| tied |") for line in rows)
    behind = next(line for line in rows if line.startswith("| streaming_llm | 0.5 |"))
    assert behind.endswith("| behind |") and "-0.667 [" in behind and "(48)" in behind
    assert "| snapkv (kvpress) ≈ | 0.5 |" in text and "kvpress 0.5.5" in text and "f00d" in text
    tables = text.split("\n\n")
    for block in tables:
        lines = block.splitlines()
        if lines and lines[0].startswith("| "):
            assert len({line.count(" | ") - line.count("\\|") for line in lines}) == 1, block
    assert markdown_table(["a", "b"], [["x|y", "<b>"]]).splitlines()[2] == "| x\\|y | &lt;b> |"
    assert "| &lt;script>x&lt;/script> | 0.75 |" in text


def test_html_report_is_self_contained_and_escaped(records, tmp_path):
    path = build_report(records, tmp_path)
    html = path.read_text()
    dense_plots = [name for name in PLOTS if name not in ("sparse_heads.png", "needle_heads.png")]  # neither ran
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)) == len(dense_plots)
    assert not re.search(r"https?://", html) and "<link" not in html
    assert html.count("<table>") == 6  # gate, headline, per task, costs, sweep, provenance
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "snapkv ★" in html and "beyond the model" in html
    for name in dense_plots:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "sparse_heads.png").exists()


def test_old_format_records_are_refused(records):
    old = {k: v for k, v in records[-1].items() if k not in ("cell", "context_id")}
    with pytest.raises(HeadwiseError, match="old one-record-per-cell format"):
        markdown_report([*records, old])


def test_cli_report_only_includes_peer_results(tmp_path, capsys):
    out = tmp_path / "run"
    peer = tmp_path / "kvpress.jsonl"
    for r in synthetic():
        append_record(peer if r["library"] == "kvpress" else out / "results.jsonl", r)
    assert main(["bench", "--report-only", "--out", str(out), "--include", str(peer)]) == 0
    printed = capsys.readouterr().out
    assert "snapkv (kvpress) ≈" in printed and "streaming_llm" in printed and (out / "report.html").exists()
    assert "kvpress:" not in printed


def test_peer_records_are_harmonized(records):
    flat = records[-1]
    assert flat["library"] == "kvpress" and flat["method"] == "snapkv" and flat["key"]
    assert flat["peak_rss"] == 2**30 and flat["samples"][0]["nll"] == pytest.approx(1.3)
    assert flat["versions"] == {"kvpress": "0.5.5"}


def test_headwise_variants_get_rows_of_their_own(records):
    base = next(r for r in synthetic() if r["method"] == "snapkv")
    plain = harmonize({**base, "method": "headwise", "options": {"profile": "p.json"}})
    variant = harmonize({**base, "method": "headwise", "options": {"profile": "p.json", "compensate": "true"}})
    assert plain["method"] == "headwise" and variant["method"] == "headwise compensate=true"
    _, (panel,) = analyse([{**plain, "key": "a"}, {**variant, "key": "b"}])
    assert sorted(s[1] for s in panel.per_task) == ["headwise", "headwise compensate=true"]
    assert panel.lines == [] and "no headline" in terminal_table([plain])  # no gate: not calibrated


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 2
    assert "no results" in capsys.readouterr().err
    assert main(["bench", "--methods", "magic", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    from headwise.bench.cli import check_methods

    check_methods(["snapkv", "quest", "roles"])  # policies and selection rules are methods
    assert main(["bench", "--tasks", "passkey,trivia", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) trivia" in capsys.readouterr().err
    assert main(["bench", "--ratios", "0.5,x", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--report-only", "--out", str(tmp_path), "--include", str(tmp_path / "none")]) == 2


def test_kv_read_per_step_follows_the_answers_read_fraction():
    from headwise.report.bench_report import read_bytes

    part = {"kv_bytes": 1000.0, "samples": [{"read_fraction": 0.25}, {"read_fraction": 0.75}]}
    assert read_bytes(part) == 500.0
    assert read_bytes({"kv_bytes": 1000.0, "samples": [{}]}) == 1000.0  # no selection: every step reads all
    assert read_bytes({"samples": []}) is None


def test_sparse_prefill_gets_rows_a_level_and_a_per_head_picture(records, tmp_path):
    from headwise.report.bench_report import sparse_heads

    sparse = []
    for r in synthetic():
        if r["method"] == "full" and not r["calibration"]:
            sparse.append(harmonize({**r, "key": r["key"] + "-sparse", "options": {"sparse": "ashape"},
                                     "computed_fraction": 0.25, "computed_fractions": [[0.2, 0.3], [1.0, 0.5]]}))
    _, (panel,) = analyse(records + sparse)
    rows = {(row[0], row[1]): row for row in cost_rows(panel)}
    assert rows["full sparse=ashape", "0"][5] == "25.0%" and rows["full", "0"][5] == "100.0%"
    (grid,) = sparse_heads([panel]).values()
    assert grid == [[pytest.approx(0.2), pytest.approx(0.3)], [1.0, 0.5]]
    build_report(records + sparse, tmp_path)
    assert (tmp_path / "sparse_heads.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_peer_without_fidelity_gets_empty_fidelity_cells(missing, tmp_path):
    """OpenVINO's runner cannot teacher-force an answer: its rows hold null (or NaN) fidelity, which the headline,
    the Markdown and the plots leave out instead of showing a number."""
    rows = synthetic()
    for task in TASKS:
        for c in range(CONTEXTS):
            peer = part("openvino", "openvino_eviction", 0.5, task, c, scores_of("snapkv", task, c))
            for s in peer["samples"]:
                s.update(nll=missing, top1=missing, nll_full=missing)
            rows.append({**peer, "protocol": "aware"})
    records = [harmonize(store.parse_line(json.dumps(r))) for r in rows]
    lines = lines_by_name(records)
    line = lines["openvino", "openvino_eviction"]
    assert line.nll_gap is None and line.top1 is None
    assert line.score.mean == pytest.approx(lines["headwise", "snapkv"].score.mean)
    table = next(r for r in markdown_report(records).splitlines() if r.startswith("| openvino_eviction [aware]"))
    cells = [c.strip() for c in table.strip("|").split(" | ")]
    assert cells[0] == "openvino_eviction [aware] (openvino) ≈" and cells[5:7] == ["", ""]
    assert not re.search(r"\bnan\b", table.lower())
    assert build_report(records, tmp_path).exists()
