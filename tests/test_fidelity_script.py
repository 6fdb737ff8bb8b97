"""scripts/fidelity.py: its teacher-forced answer likelihood against a plain forward pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

from conftest import tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fidelity.py"


def load_script():
    spec = importlib.util.spec_from_file_location("fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_follow_with_the_full_cache_matches_one_dense_forward_pass():
    fidelity = load_script()
    model = tiny_model("llama")
    lm = SimpleNamespace(model=model)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    head, tail, answer = ids[:30], ids[30:34], ids[34:]
    cache, _ = fidelity.compressed_context(lm, "full", {}, 0.0, head)
    nll, top1 = fidelity.follow(lm, cache, tail, answer)
    with torch.inference_mode():
        logp = model(input_ids=torch.tensor([ids])).logits[0, 33:-1].float().log_softmax(-1)
    target = torch.tensor(answer)
    assert abs(nll - (-logp[range(6), target].mean().item())) < 1e-4
    assert top1 == (logp.argmax(-1) == target).float().mean().item()
    compressed, _ = fidelity.compressed_context(lm, "streaming_llm", {}, 0.8, head)
    assert fidelity.follow(lm, compressed, tail, answer)[0] != nll  # evicting 80% of the context changes it


def test_fidelity_rows_resume_past_a_torn_line_and_average_per_spec_and_ratio(tmp_path):
    from headwise.bench.fidelity import read_rows, summary
    from headwise.bench.store import append_record

    path = tmp_path / "fidelity.jsonl"
    rows = [
        {"row": "full|a", "answer": [1, 2]},
        {"row": "snapkv|0.75|a", "spec": "snapkv", "ratio": 0.75, "task": "kv", "nll": 1.0, "top1": 0.5},
        {"row": "snapkv|0.75|b", "spec": "snapkv", "ratio": 0.75, "task": "kv", "nll": 3.0, "top1": 1.0},
        {"row": "full|0.0|a", "spec": "full", "ratio": 0.0, "task": "kv", "nll": 0.25, "top1": 1.0},
    ]
    for row in rows:
        append_record(path, row)
    with open(path, "a") as fh:
        fh.write('{"row": "snapkv|0.9|a", "nl')  # interrupted mid-write
    found = read_rows(path)
    assert set(found) == {r["row"] for r in rows}
    # sample b has no full-cache row, so no excess over the full cache for snapkv
    assert summary(list(found.values())) == [("snapkv", 0.75, 2.0, 0.75, 2, None), ("full", 0.0, 0.25, 1.0, 1, 0.0)]
    append_record(path, {**rows[1], "nll": 5.0})  # a rerun row replaces the old one
    append_record(path, {**rows[3], "row": "full|0.0|b", "nll": 1.0})
    assert summary(list(read_rows(path).values()))[0] == ("snapkv", 0.75, 4.0, 0.75, 2, (4.75 + 2.0) / 2)
