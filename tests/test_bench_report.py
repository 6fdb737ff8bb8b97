"""Benchmark report: self-contained HTML with embedded plots, tables, escaped text; the CLI around it."""

from __future__ import annotations

import json
import re

import pytest

from headwise.bench import store
from headwise.bench.store import append_record
from headwise.cli import main
from headwise.report.bench_report import (
    PLOTS,
    build_report,
    harmonize,
    markdown_table,
    score_grid,
    summary,
    terminal_table,
)


def record(library: str, method: str, ratio: float, task: str, length: int, score: float, **extra) -> dict:
    return {
        "key": f"{library}-{method}-{ratio}-{task}-{length}-{extra.get('protocol', 'agnostic')}",
        "library": library, "model": "m", "method": method, "ratio": ratio, "task": task, "length": length,
        "protocol": "agnostic", "n_samples": 2, "score": score, "kv_bytes": (1 - ratio) * 2**20 * length / 1024,
        "peak_rss": 2**30, "peak_rss_delta": 2**25, "prefill_seconds": length / 1000, "question_seconds": 0.1,
        "decode_tokens_per_second": 20.0, "versions": {"torch": "2.13.0"}, "git_commit": "abc",
        "machine": {"platform": "Linux", "cpu_count": 2}, "timestamp": "2026-01-01T00:00:00+00:00", **extra,
    }


def as_peer(flat: dict) -> dict:
    """The same cell in the kvpress runner's shape: no key, metrics and metadata nested, other names."""
    metrics = {"kv_bytes": flat["kv_bytes"], "prefill_seconds": flat["prefill_seconds"],
               "decode_tokens_per_second": flat["decode_tokens_per_second"], "peak_rss_bytes": flat["peak_rss"],
               "peak_rss_delta_bytes": flat["peak_rss_delta"], "n_samples": 2}
    identity = ("library", "model", "ratio", "task", "length", "protocol", "score")
    return {**{k: flat[k] for k in identity}, "method": f"kvpress:{flat['method']}", "options": {},
            "metrics": metrics, "metadata": {"versions": {"kvpress": "0.2"}}}


@pytest.fixture
def records() -> list[dict]:
    rows = []
    for length in (1024, 2048):
        for task in ("passkey", "qa"):
            rows.append(record("headwise", "full", 0.0, task, length, 1.0))
            rows.append(record("kvpress", "full", 0.0, task, length, 0.95))
            for ratio in (0.5, 0.75):
                rows.append(record("headwise", "snapkv", ratio, task, length, 1 - ratio / 2))
                rows.append(record("headwise", "snapkv", ratio, task, length, 1 - ratio / 3, protocol="aware"))
                rows.append(record("kvpress", "snapkv", ratio, task, length, 1 - ratio))
                rows.append(record("headwise", "<script>alert(1)</script>", ratio, task, length, 0.1))
    return rows


def test_summary_has_one_row_per_method_ratio_protocol(records):
    headers, rows = summary(records)
    assert "passkey 1024" in headers and "qa 2048" in headers
    keys = {(r[0], r[2], r[3], r[4]) for r in rows}
    assert ("kvpress", "snapkv", "0.5", "agnostic") in keys and ("headwise", "snapkv", "0.75", "aware") in keys
    assert len(rows) == len(keys)
    assert "snapkv" in terminal_table(records)


def test_html_report_is_self_contained_and_escaped(records, tmp_path):
    path = build_report(records, tmp_path)
    html = path.read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)) == len(PLOTS)
    assert not re.search(r"https?://", html)
    assert html.count("<table>") == 4
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for name in PLOTS:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_cli_report_only_includes_peer_results(records, tmp_path, capsys):
    out = tmp_path / "run"
    peer = tmp_path / "kvpress.jsonl"
    for r in records:
        if r["library"] == "kvpress":
            append_record(peer, as_peer(r))
        else:
            append_record(out / "results.jsonl", r)
    assert main(["bench", "--report-only", "--out", str(out), "--peer", str(peer)]) == 0
    printed = capsys.readouterr().out
    assert "kvpress" in printed and (out / "report.html").exists()
    assert "kvpress:" not in printed and "peak" not in capsys.readouterr().err


def test_peer_records_are_harmonized(records):
    flat = harmonize(store.parse_line(json.dumps(as_peer(records[1]))))
    assert flat["method"] == "full" and flat["library"] == "kvpress" and flat["key"]
    assert flat["peak_rss_delta"] == records[1]["peak_rss_delta"] and flat["kv_bytes"] == records[1]["kv_bytes"]


def test_headwise_variants_get_rows_of_their_own(records):
    base = {**records[1], "library": "headwise", "method": "headwise", "ratio": 0.75}
    plain = harmonize({**base, "options": {"profile": "p.json"}})
    variant = harmonize({**base, "options": {"profile": "p.json", "compensate": "true"}})
    assert plain["method"] == "headwise" and variant["method"] == "headwise compensate=true"
    rows = summary([plain, variant])[1]
    assert sorted(row[2] for row in rows) == ["headwise", "headwise compensate=true"]


def test_score_grid_puts_methods_side_by_side(records):
    headers, rows = score_grid(records)
    assert headers[3:] == ["1024 @0", "1024 @0.5", "1024 @0.75", "2048 @0", "2048 @0.5", "2048 @0.75"]
    by_key = {tuple(r[:3]): r[3:] for r in rows}
    # snapkv (agnostic) scores 1 - ratio / 2 on both tasks; the full cache has the ratio-0 column only
    assert by_key["headwise", "snapkv", "agnostic"] == ["", "0.750", "0.625", "", "0.750", "0.625"]
    assert by_key["kvpress", "full", "agnostic"] == ["0.950", "", "", "0.950", "", ""]
    assert ("headwise", "snapkv", "aware") in by_key
    partial = [r for r in records if not (r["method"] == "snapkv" and r["task"] == "qa" and r["ratio"] == 0.5)]
    by_key = {tuple(r[:3]): r[3:] for r in score_grid(partial)[1]}
    assert by_key["headwise", "snapkv", "agnostic"][1] == "0.750 (1/2 tasks)"


def test_a_cell_in_two_stores_counts_once(tmp_path, records, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    for r in records:
        append_record(out / "results.jsonl", {**r, "key": f"{r['library']}{r['method']}{r['ratio']}{r['task']}"
                                              f"{r['length']}{r['protocol']}"})
    full_passkey = dict(next(r for r in store.read_records(out / "results.jsonl")
                             if r["method"] == "full" and r["task"] == "passkey" and r["library"] == "headwise"))
    append_record(tmp_path / "again.jsonl", {**full_passkey, "score": 0.0})
    again = str(tmp_path / "again.jsonl")
    assert main(["bench", "--report-only", "--markdown", "--out", str(out), "--peer", again]) == 0
    grid = capsys.readouterr().out.splitlines()
    full = next(line for line in grid if line.startswith("| headwise | full |"))
    assert full.split(" | ")[3] == "1.000"  # the duplicate (score 0) was dropped, not averaged in


def test_markdown_tables_one_per_length(tmp_path, records, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    for r in records:
        append_record(out / "results.jsonl", r)
    assert main(["bench", "--report-only", "--markdown", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lengths = sorted({r["length"] for r in records})
    assert [line for line in printed.splitlines() if line.startswith("####")] == [f"#### {n} tokens" for n in lengths]
    headers = [line for line in printed.splitlines() if line.startswith("| library | model |")]
    assert len(headers) == 2 and "passkey 1024" in headers[0] and "passkey 2048" not in headers[0]
    per_length = printed.split("####", 1)[1]
    table = [line for line in per_length.splitlines() if line.startswith("|")]
    assert {line.count(" | ") for line in table} == {len(headers[0].split(" | ")) - 1}
    assert printed.startswith("| library | method | protocol | 1024 @0 |")  # the side-by-side grid first
    assert markdown_table(["a", "b"], [["x|y", 1]]).splitlines()[2] == "| x\\|y | 1 |"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 2
    assert "no results" in capsys.readouterr().err
    assert main(["bench", "--methods", "magic", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["bench", "--tasks", "passkey,trivia", "--out", str(tmp_path)]) == 2
    assert "unknown task(s) trivia" in capsys.readouterr().err
    assert main(["bench", "--ratios", "0.5,x", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--report-only", "--out", str(tmp_path), "--peer", str(tmp_path / "none")]) == 2
