"""Prompt building: --truncate cuts the start of the user's text, never the chat template."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bench_helpers import tiny_lm
from headwise.cli import main
from headwise.errors import HeadwiseError
from headwise.generation import GenerationResult, build_prompt, check_length, longest_fitting_end

WORDS = [f"w{i}" for i in range(100)]
SPECIAL = ["<|im_start|>", "<|im_end|>", "user", "assistant"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a ChatML template, built in memory (ids below the tiny Llama's vocabulary)."""
    vocab = {w: i for i, w in enumerate(["[UNK]", *SPECIAL, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("<|im_start|>", "isolated"), pre_tokenizers.Split("<|im_end|>", "isolated"),
        pre_tokenizers.WhitespaceSplit(),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>")
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture
def chat_lm():
    lm = tiny_lm(context_length=64)
    lm.tokenizer, lm.instruct = chat_tokenizer(), True
    return lm


def words(lm, ids: list[int]) -> list[str]:
    return lm.tokenizer.convert_ids_to_tokens(ids)


def test_truncation_keeps_the_chat_template_and_the_end_of_the_text(chat_lm):
    text = " ".join(WORDS)
    whole = build_prompt(chat_lm, text)
    assert words(chat_lm, whole) == ["<|im_start|>", "user", *WORDS, "<|im_end|>", "<|im_start|>", "assistant"]
    assert build_prompt(chat_lm, text, max_tokens=len(whole)) == whole  # fits: unchanged
    kept = build_prompt(chat_lm, text, max_tokens=30)
    assert words(chat_lm, kept) == ["<|im_start|>", "user", *WORDS[-25:], "<|im_end|>", "<|im_start|>", "assistant"]
    with pytest.raises(HeadwiseError, match="no room is left for its text"):
        build_prompt(chat_lm, text, max_tokens=5)


def test_generate_truncate_fits_the_context_minus_the_new_tokens(chat_lm, monkeypatch, capsys):
    import headwise.generation
    import headwise.models

    monkeypatch.setattr(headwise.models, "load_model", lambda name, dtype="float32": chat_lm)
    assert main(["generate", "-n", "4", " ".join(WORDS)]) == 2
    assert "pass --truncate" in capsys.readouterr().err
    prompts = []

    def fake_generate(lm, prompt_ids, **kwargs) -> GenerationResult:
        prompts.append(prompt_ids)
        return GenerationResult([], "", len(prompt_ids), 0, 0.0, 0.0)

    monkeypatch.setattr(headwise.generation, "generate", fake_generate)
    assert main(["generate", "-n", "4", "--truncate", " ".join(WORDS)]) == 0
    (prompt,) = prompts
    assert len(prompt) == 64 - 4
    assert words(chat_lm, prompt)[:2] == ["<|im_start|>", "user"] and words(chat_lm, prompt)[2] == WORDS[-55]
    assert words(chat_lm, prompt)[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]
    check_length(prompt, 64, 4)


def test_longest_fitting_end_cuts_at_a_word_when_one_fits():
    assert longest_fitting_end("one two three four", lambda end: len(end) <= 11) == "three four"
    assert longest_fitting_end("abcdefghij", lambda end: len(end) <= 3) == "hij"  # one long word: characters
    assert longest_fitting_end("abc", lambda end: False) == ""


@pytest.mark.slow
def test_truncation_with_the_smollm2_chat_template(smollm2):
    text = "The start of a long document. " + "Some words that repeat. " * 3000 + "The question at the end?"
    room = smollm2.info.context_length - 16
    whole = build_prompt(smollm2, text)
    kept = build_prompt(smollm2, text, max_tokens=room)
    assert len(whole) > room >= len(kept) > room - 8
    tok = smollm2.tokenizer
    probe = build_prompt(smollm2, "X")
    x = probe.index(tok.convert_tokens_to_ids("X"))
    head, tail = probe[:x], probe[x + 1 :]  # the template before the user's text (its system prompt too), after
    assert kept[: len(head)] == head and kept[-len(tail) :] == tail
    decoded = tok.decode(kept)
    assert "The start of a long document" not in decoded and "The question at the end?<|im_end|>" in decoded


def test_prefill_progress_advances_once_per_decoder_layer_of_each_chunk(capsys):
    import torch

    from conftest import tiny_model
    from headwise.api import make_cache
    from headwise.generation import prefill

    model = tiny_model("llama")  # 3 decoder layers
    shown = prefill(model, torch.arange(40)[None], make_cache(model, "knorm", ratio=0.5), chunk_size=16,
                    progress=True)  # 3 chunks
    err = capsys.readouterr().err
    assert "prefill 40 tokens: 100%" in err and "9/9" in err
    quiet = prefill(model, torch.arange(40)[None], make_cache(model, "knorm", ratio=0.5), chunk_size=16)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(shown, quiet, rtol=0, atol=0)  # the bar's hooks change nothing


@pytest.mark.parametrize("command", [["generate", "hi"], ["bench", "--out", "unused"], ["profile", "--out", "unused"]])
def test_threads_below_one_are_refused_before_loading(capsys, command):
    assert main([*command, "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
