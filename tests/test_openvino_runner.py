"""The OpenVINO peer runner's own parts (scripts/peers/openvino_runner.py), without openvino installed: the budget
against a block-by-block simulation of OpenVINO's eviction and a search over every budget, the cells, and a sweep
through headwise's sweep with a stand-in for OpenVINO's pipeline, whose records the report reads. The pipeline
itself runs in .venv-openvino (BENCHMARKS.md, "Question-aware: OpenVINO GenAI's cache eviction")."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from bench_helpers import count_words, tiny_lm
from headwise.bench import tasks
from headwise.bench.calibration import FULL
from headwise.bench.protocol import Answer
from headwise.bench.store import read_records
from headwise.errors import HeadwiseError
from headwise.report.bench_report import analyse, cost_rows, harmonize, markdown_report

PEERS = Path(__file__).resolve().parents[1] / "scripts" / "peers"


@pytest.fixture(scope="module")
def ovr():
    """The runner as a module (its folder on the path for the kvpress runner's helpers it imports)."""
    had = "kvpress_runner" in sys.modules
    sys.path.insert(0, str(PEERS))
    spec = importlib.util.spec_from_file_location("openvino_runner", PEERS / "openvino_runner.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["openvino_runner"] = module
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(PEERS))
    del sys.modules["openvino_runner"]
    if not had:
        sys.modules.pop("kvpress_runner", None)


@pytest.fixture
def versions(ovr, monkeypatch):
    """Pretend versions (openvino is not installed here); the fingerprint is recomputed from them."""
    current = {"openvino": "2026.4.1", "openvino-genai": "2026.4.1.0", "transformers": "5.5.4", "torch": "2.13.0",
               "headwise": "0.1.0"}
    monkeypatch.setattr(ovr, "peer_versions", lambda: dict(current))
    ovr.fingerprint.cache_clear()
    yield current
    ovr.fingerprint.cache_clear()


def simulate(length: int, max_cache_size: int, start: int, recent: int, block: int) -> int:
    """Tokens held after one eviction, as cache_eviction.cpp counts it block by block: nothing goes while the
    sequence fits in ``max_cache_size + block - 1``; else the evictable blocks lie between the start blocks and
    the recent ones (the last, partly filled block is not among them), and (max - start - recent) / block of
    them stay."""
    if length <= max_cache_size + block - 1:
        return length
    evictable = length // block - recent // block - start // block
    evicted = max(0, evictable - (max_cache_size - start - recent) // block)
    return length - evicted * block


def best_by_search(prompt: int, ratio: float, start: int, recent: int, block: int) -> int:
    """The budget that keeps the prompt tokens nearest the request, among every valid one (the smaller on a tie)."""
    requested = (1 - ratio) * prompt
    sizes = range(start + recent + block, max(prompt, start + recent) + 2 * block + 1, block)
    return min(sizes, key=lambda m: (abs(simulate(prompt + 1, m, start, recent, block) - 1 - requested), m))


@pytest.mark.parametrize("block,start,recent", [(32, 32, 32), (32, 64, 128), (16, 16, 48)])
def test_held_tokens_follow_openvinos_blocks(ovr, block, start, recent):
    for size in range(start + recent + block, 640, block):
        for length in range(1, 900, 7):
            assert ovr.held_after_eviction(length, size, block) == simulate(length, size, start, recent, block)


@pytest.mark.parametrize("start,recent", [(32, 32), (64, 128)])
def test_the_budget_is_the_nearest_of_every_valid_size(ovr, start, recent):
    for prompt in range(150, 3000, 37):
        for ratio in (0.1, 0.25, 0.5, 0.75, 0.9, 0.95):
            got = ovr.budget(prompt, ratio, start, recent)
            assert got.max_cache_size == best_by_search(prompt, ratio, start, recent, ovr.BLOCK), (prompt, ratio)
            assert got.kept == simulate(prompt + 1, got.max_cache_size, start, recent, ovr.BLOCK) - 1
            assert got.max_cache_size % ovr.BLOCK == 0 and got.max_cache_size > start + recent
            reachable = start + recent + ovr.BLOCK + (prompt + 1) % ovr.BLOCK - 1  # the fewest it can keep
            if got.requested >= reachable:
                assert abs(got.kept - got.requested) <= ovr.BLOCK / 2


def test_the_budget_cannot_go_below_openvinos_smallest_cache(ovr):
    """A 922-token prompt at 90% removed asks for 92 tokens; OpenVINO keeps at least three blocks (start, one
    evictable, recent) and the 27 tokens of the last one."""
    got = ovr.budget(922, 0.9)
    assert (got.max_cache_size, got.kept) == (96, 122) and got.kept_fraction == pytest.approx(122 / 922)
    assert ovr.budget(922, 0.75).max_cache_size == 192 and ovr.budget(922, 0.75).kept == 218
    assert ovr.budget(100, 0.1).kept == 100  # asked for more than it can hold back: nothing evicted


def test_cells_put_the_full_cache_first_and_key_the_eviction_options(ovr, versions):
    cells = ovr.plan_cells("m", ovr.Eviction(), [0.5, 0.9], "passkey", 2048, 3, 0, "float32")
    assert [(c.method, c.ratio, c.protocol) for c in cells] == [
        (FULL, 0.0, "agnostic"), (ovr.METHOD, 0.5, "aware"), (ovr.METHOD, 0.9, "aware")]
    assert cells[0].is_reference and cells[1].resolved["block_size"] == 32 and cells[1].resolved["start_size"] == 32
    assert len({c.key() for c in cells}) == 3
    wider = ovr.plan_cells("m", ovr.Eviction(recent_size=64), [0.5], "passkey", 2048, 3, 0, "float32")
    assert wider[0].key() == cells[0].key() and wider[1].key() != cells[1].key()
    for bad in (ovr.Eviction(start_size=16), ovr.Eviction(recent_size=0), ovr.Eviction(aggregation_mode="MAX")):
        with pytest.raises(HeadwiseError):
            bad.check()


class StandIn:
    """What the runner asks of OpenVINO, without it: the full cache answers 'tA tB', an evicted one 'tA tC' below
    a budget of 100 tokens (the stand-in's second answer token is its first after the eviction)."""

    def __init__(self, ovr):
        self.ovr = ovr
        self.budgets: list[int | None] = []

    def parts(self, lm):
        stand_in = self

        class Parts(self.ovr.Parts):
            def pipeline(self, max_cache_size):
                self.block_bytes, self.settings = 1024.0, {"inference_precision": "float32"}
                stand_in.budgets.append(max_cache_size)
                return max_cache_size

            def generate(self, pipe, ids, sample):
                tokens = [7, 9 if pipe is None or pipe >= 100 else 11, 0]
                text = self.lm.tokenizer.decode(tokens)
                answer = Answer(tokens, text, float(text == "t7 t9"), 0.25, 40.0)
                return stand_in.ovr.Generated(answer, 3)

        return Parts(lm, Path("ir"), self.ovr.Eviction(), threads=1)


def test_a_sweep_writes_headwise_part_records_that_the_report_reads(ovr, versions, tmp_path):
    lm = tiny_lm()
    questions = tasks.generate("passkey", 768, 2, 0, count_words, tokenizer_name="words")
    work = {("passkey", 768, 0): [[q for q in questions if q.context_id == c] for c in
                                  dict.fromkeys(q.context_id for q in questions)]}
    stand_in = StandIn(ovr)
    store = tmp_path / "openvino.jsonl"
    records = ovr.sweep(stand_in.parts(lm), work, [0.5, 0.9], store, "float32", progress=False)
    assert len(records) == 2 * 3 and [r["method"] for r in records[:3]] == [FULL, ovr.METHOD, ovr.METHOD]
    assert None in stand_in.budgets and all(b is None or b % 32 == 0 for b in stand_in.budgets)
    for r in records:
        assert r["library"] == "openvino" and r["versions"]["openvino-genai"] == "2026.4.1.0"
        assert r["kv_bytes_basis"] == ovr.KV_BASIS and r["kv_bytes"] <= r["kv_bytes_peak"]
        for row in r["samples"]:
            assert row["nll"] is None and row["top1"] is None and row["nll_full"] is None
            assert row["question_seconds"] == 0.25 and row["decode_tokens_per_second"] == 40.0
            assert row["headwise_prefill_seconds"] > 0 and row["headwise_decode_tokens_per_second"] >= 0
            budget = ovr.budget(row["prompt_tokens"], r["ratio"]) if r["ratio"] else None
            assert row["kept_tokens"] == (budget.kept if budget else row["prompt_tokens"])
            assert row["same_as_full"] == (None if r["method"] == FULL else budget.max_cache_size >= 100)
    assert ovr.sweep(stand_in.parts(lm), work, [0.5, 0.9], store, "float32", progress=False) == []  # resumed
    assert len(read_records(store)) == 6
    stored = [harmonize(r) for r in read_records(store)]
    _, (panel,) = analyse(stored)
    costs = {row[0]: row for row in cost_rows(panel)}
    assert set(costs) == {"full (openvino)", "openvino_eviction [aware] (openvino)"}
    assert "openvino_eviction [aware] (openvino)" in markdown_report(stored)
    assert not re.search(r"\bnan\b", markdown_report(stored).lower())
    assert "openvino_eviction" in ovr.summary(records)
