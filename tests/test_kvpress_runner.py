"""The kvpress peer runner's own parts (scripts/peers/kvpress_runner.py), without kvpress installed: press options
as keys hold them, positions that continue the uncompressed context, the selection of contexts, the cells and the
refusal of a store of other versions. The presses themselves run in .venv-kvpress (``--check-pipeline`` compares
the runner with kvpress's own pipeline there)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from headwise.bench.calibration import CALIBRATION_SEED, FULL
from headwise.bench.tasks import Sample
from headwise.compat import cache_kwargs
from headwise.errors import HeadwiseError

PATH = Path(__file__).resolve().parents[1] / "scripts" / "peers" / "kvpress_runner.py"


@pytest.fixture(scope="module")
def kr():
    spec = importlib.util.spec_from_file_location("kvpress_runner", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvpress_runner"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["kvpress_runner"]


@pytest.fixture
def versions(kr, monkeypatch):
    """Pretend versions (kvpress is not installed here); the fingerprint is recomputed from them."""
    current = {"kvpress": "0.5.5", "transformers": "5.2.0", "torch": "2.13.0", "headwise": "0.1.0"}
    monkeypatch.setattr(kr, "peer_versions", lambda: dict(current))
    kr.fingerprint.cache_clear()
    yield current
    kr.fingerprint.cache_clear()


@dataclass
class InnerPress:
    compression_ratio: float = 0.0
    window_size: int = 64


@dataclass
class OuterPress:
    press: InnerPress
    alpha: float = 0.2
    scratch: int = field(init=False, default=7)  # state, not an option


def fake_specs(kr) -> dict:
    return {"outer": kr.PressSpec("outer", "OuterPress(InnerPress)", {}, lambda r: OuterPress(InnerPress(r)))}


def test_press_options_hold_every_init_field_and_nested_presses(kr):
    assert kr.press_options(None) == {}
    assert kr.press_options(OuterPress(InnerPress(0.75), alpha=0.3)) == {
        "class": "OuterPress",
        "press": {"class": "InnerPress", "compression_ratio": 0.75, "window_size": 64},
        "alpha": 0.3,
    }


def test_cells_put_the_full_cache_first_and_key_the_resolved_options(kr, versions):
    specs = fake_specs(kr)
    cells = kr.plan_cells("m", specs, ["outer"], [0.5, 0.75], "passkey", 2048, 3, 0)
    assert [(c.method, c.ratio) for c in cells] == [(FULL, 0.0), ("outer", 0.5), ("outer", 0.75)]
    assert cells[1].resolved["press"]["compression_ratio"] == 0.5
    assert len({c.key() for c in cells}) == 3
    wider = {"outer": dataclasses.replace(specs["outer"], build=lambda r: OuterPress(InnerPress(r, window_size=32)))}
    assert kr.plan_cells("m", wider, ["outer"], [0.5], "passkey", 2048, 3, 0)[1].key() != cells[1].key()


def test_fingerprint_follows_the_versions(kr, versions):
    before = kr.fingerprint()
    versions["kvpress"] = "0.5.6"
    kr.fingerprint.cache_clear()
    assert kr.fingerprint() != before


def test_a_store_of_other_versions_is_refused(kr, versions, tmp_path):
    store = tmp_path / "kvpress.jsonl"
    other = {
        "key": "k",
        "library": "kvpress",
        "model": "m",
        "method": FULL,
        "ratio": 0.0,
        "task": "passkey",
        "length": 2048,
        "protocol": "agnostic",
        "score": 1.0,
        "fingerprint": "0123456789abcdef",
    }
    store.write_text(json.dumps(other) + "\n")
    with pytest.raises(HeadwiseError, match="other code or versions"):
        kr.sweep(None, {}, {}, [], [], store)
    assert kr.sweep(None, {}, {}, [], [], store, allow_mixed=True) == []


def sample(context: str, q: int, seed: int = 0, task: str = "passkey", length: int = 2048) -> Sample:
    return Sample(
        id=f"{context}-q{q}",
        context_id=context,
        task=task,
        length=length,
        token_length=length,
        depth=0.5,
        needle_depth=0.5,
        context=context,
        question=f"q{q}?",
        answer_prefix="The answer is",
        answers=["1"],
        scoring="contains",
        max_new_tokens=4,
        seed=seed,
        tokenizer="t",
    )


def test_select_groups_questions_by_context_and_leaves_out_the_calibration_seed(kr):
    samples = [
        sample("a", 0),
        sample("a", 1),
        sample("b", 0),
        sample("c", 0),
        sample("z", 0, seed=CALIBRATION_SEED),
        sample("k", 0, task="multikey"),
        sample("l", 0, length=4096),
    ]
    work = kr.select(samples, {"passkey"}, {2048}, 2)
    assert list(work) == [("passkey", 2048, 0)]
    assert [[s.id for s in ctx] for ctx in work["passkey", 2048, 0]] == [["a-q0", "a-q1"], ["b-q0"]]
    every = kr.select(samples, set(), set(), None)
    assert set(every) == {("passkey", 2048, 0), ("multikey", 2048, 0), ("passkey", 4096, 0)}
    assert len(every["passkey", 2048, 0]) == 3


def drop_front(cache, n: int) -> None:
    """What an evicting press does to a DynamicCache: the entries of ``n`` context tokens are gone (here the first)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]
    cache.removed = n


@torch.inference_mode()
def test_positions_continue_the_uncompressed_context(kr):
    model = tiny_model("llama")
    context, question = torch.randint(0, 128, (1, 12)), torch.randint(0, 128, (1, 3))
    wrapped = kr.ContinuedPositions(model)

    def run(cache, ids, **kw):
        return model(input_ids=ids, **cache_kwargs(model, cache), **kw).logits

    plain, cache = kr.PressCache(), kr.PressCache()
    run(plain, context)
    wrapped(input_ids=context, cache=cache)
    assert torch.equal(wrapped(input_ids=question, cache=cache).logits, run(plain, question))  # nothing removed

    cache, default, explicit = kr.PressCache(), kr.PressCache(), kr.PressCache()
    for c in (cache, default, explicit):
        run(c, context)
        drop_front(c, 4)
    got = wrapped(input_ids=question, cache=cache).logits
    assert torch.equal(got, run(explicit, question, position_ids=torch.arange(12, 15)[None]))
    assert not torch.allclose(got, run(default, question))  # what the bare model does: positions 8 to 10
    token = got[:, -1].argmax(-1, keepdim=True)  # the next token continues at position 15
    assert torch.equal(
        wrapped(input_ids=token, cache=cache).logits, run(explicit, token, position_ids=torch.tensor([[15]]))
    )
