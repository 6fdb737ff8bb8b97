"""Where the needle went: the needle's token positions, the share each head holds, and the report's picture."""

from __future__ import annotations

import pytest
import torch

from bench_helpers import count_words, tiny_lm
from headwise.bench import protocol, tasks
from headwise.explain.needles import needle_kept, needle_positions, overlapping
from headwise.report.bench_report import _needle_png, needle_heads


def test_overlapping_tokens_of_character_spans():
    offsets = [(0, 3), (3, 4), (4, 9), (9, 9), (10, 12)]
    assert overlapping(offsets, [(4, 6)]) == [2]
    assert overlapping(offsets, [(2, 5), (11, 20)]) == [0, 1, 2, 4]
    assert overlapping(offsets, [(9, 10)]) == []  # an empty token never overlaps


def test_needle_kept_is_the_share_of_the_needle_each_head_holds():
    held = {1: [torch.tensor([0, 5, 6, 7]), torch.tensor([0, 1, 2])], 3: [torch.tensor([5, 6])]}
    assert needle_kept(held, [5, 6, 7, 7]) == {"1": [1.0, 0.0], "3": [0.6667]}


@pytest.mark.parametrize("task", ["passkey", "multikey", "vartrack", "qa"])
def test_needle_positions_hold_the_answer_in_the_prompt_tokens(task):
    lm = tiny_lm()
    sample = tasks.generate(task, 768, 1, 0, count_words, tokenizer_name="words")[0]
    head, _ = protocol.prompt_parts(lm, sample)
    positions = needle_positions(lm, sample)
    answer = lm.tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"]
    assert positions and max(positions) < len(head)
    assert all(head[p] in answer for p in positions)
    assert sum(head[p] == answer[0] for p in positions) >= 1


@pytest.mark.slow
def test_needle_positions_on_smollm2_chat_prompts_decode_to_the_answer(smollm2):
    sample = tasks.generate("passkey", 600, 1, 0, tasks.token_counter(smollm2.tokenizer),
                            tokenizer_name=smollm2.name)[0]
    head, _ = protocol.prompt_parts(smollm2, sample)
    text = "".join(smollm2.tokenizer.decode([head[p]]) for p in needle_positions(smollm2, sample))
    assert sample.answers[0] in text and len(text) <= 4 * len(sample.answers[0]) + 8


def test_the_report_draws_the_needle_per_head_for_wrong_and_right_answers():
    from headwise.report.bench_report import Panel

    def part(method, score, shares):
        return {"library": "headwise", "method": method, "protocol": "agnostic",
                "samples": [{"score": score, "needle_kept": {"0": shares, "2": shares}}]}

    parts = [part("snapkv", 0.0, [0.0, 1.0]), part("snapkv", 0.0, [0.5, 1.0]), part("snapkv", 1.0, [1.0, 1.0]),
             part("full", 1.0, [1.0, 1.0])]
    panel = Panel("tiny", 768, {}, [], {}, parts)
    found = needle_heads([panel])
    wrong, count = found["tiny, 768 tokens", "snapkv"]["wrong"]
    assert count == 2 and wrong == [[0.25, 1.0], [0.25, 1.0]]
    assert _needle_png(found).startswith(b"\x89PNG")
