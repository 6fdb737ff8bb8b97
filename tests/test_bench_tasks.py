"""Benchmark tasks: deterministic, the answer really is in the context at the stated depth and length."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench_helpers import count_words
from headwise.bench import haystack, scoring, tasks
from headwise.errors import HeadwiseError


def make(task: str, length: int = 1024, n: int = 3, seed: int = 0) -> list[tasks.Sample]:
    return tasks.generate(task, length, n, seed, count_words, tokenizer_name="words")


def test_haystack_is_real_varied_prose():
    paragraphs = haystack.paragraphs()
    assert len(paragraphs) > 500
    assert len(set(paragraphs)) == len(paragraphs)
    assert all("\n" not in p and "::=" not in p for p in paragraphs)
    titles = [s.title for s in haystack.sections()]
    assert len(titles) == len({t.lower() for t in titles}) > 50


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generation_is_deterministic_and_varied(task):
    first, again = make(task), make(task)
    assert first == again
    assert len({s.context for s in first}) == len(first)
    assert make(task, seed=1)[0].context != first[0].context
    assert [s.id for s in first] == [f"{task}-1024-s0-{i}" for i in range(3)]


def needle_span(sample: tasks.Sample) -> tuple[float, float]:
    """Where the (first) needle starts and ends, as fractions of the context's words.

    Needles are one or two sentences, except qa's: a whole section, a fifth of a 1K context or more.
    """
    if sample.task != "qa":
        return sample.needle_depth, sample.needle_depth
    section = sample.context[sample.context.index(f"## {sample.answers[0]}") :].split("\n\n## ")[0]
    return sample.needle_depth, sample.needle_depth + count_words(section) / count_words(sample.context)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [1024, 2048])
def test_answer_in_context_at_depth_and_length(task, length):
    for sample in make(task, length):
        budget = length - tasks.HEADROOM
        assert tasks.MIN_FILL * budget <= sample.token_length <= budget
        assert sample.token_length == count_words(sample.prompt)
        start, end = needle_span(sample)
        assert start - 0.12 <= sample.depth <= end + 0.12
        assert sample.context.startswith(tasks.PREAMBLES[task] + tasks.SEPARATOR)
        for answer in sample.answers:
            assert answer in sample.context
        assert scoring.score(sample.scoring, " ".join(sample.answers), sample.answers) == 1.0


def test_stated_depth_matches_needle_position():
    for sample in make("passkey", 2048):
        key = sample.answers[0]
        before = sample.context[: sample.context.index(f"The pass key is {key}")]
        assert count_words(before) / count_words(sample.context) == pytest.approx(sample.needle_depth, abs=0.01)


def test_qa_sentence_is_unique_and_title_is_in_context():
    for sample in make("qa", 2048):
        sentence = sample.question.split('"')[1]
        assert sample.context.count(sentence) == 1
        title = sample.answers[0]
        section = sample.context[sample.context.index(f"## {title}") :]
        assert sentence in section.split("\n\n## ")[0]
        assert not scoring.contains(sentence, [title])  # quoting the title would give the answer away


def test_no_qa_sentence_contains_its_answer():
    sections = haystack.sections()
    candidates = tasks._qa_candidates()
    assert len(candidates) > 300
    assert not any(scoring.contains(sentence, [sections[i].title]) for i, sentence in candidates)


def test_vartrack_chain_is_in_order():
    sample = make("vartrack", 1024, n=1)[0]
    first, *rest = sample.answers
    positions = [sample.context.index(f"VAR {first} = ")]
    for previous, name in zip(sample.answers, rest, strict=False):
        positions.append(sample.context.index(f"VAR {name} = VAR {previous}."))
    assert positions == sorted(positions)


def test_jsonl_round_trip_and_plain_format(tmp_path):
    samples = make("multivalue", 1024)
    path = tasks.task_file(tmp_path, "multivalue", 1024, 0)
    tasks.write_samples(path, samples)
    assert tasks.read_samples(path) == samples
    line = json.loads(path.read_text().splitlines()[0])
    assert set(line) == {
        "id", "task", "length", "token_length", "depth", "needle_depth", "context", "question", "answers",
        "scoring", "max_new_tokens", "seed", "tokenizer",
    }
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(HeadwiseError, match=":4:"):
        tasks.read_samples(path)


@pytest.mark.parametrize(
    ("args", "match"),
    [(("nope", 1024, 1), "unknown task"), (("passkey", 100, 1), "at least"), (("passkey", 1024, 0), "samples")],
)
def test_bad_input_is_a_clear_error(args, match):
    with pytest.raises(HeadwiseError, match=match):
        tasks.generate(*args, 0, count_words, tokenizer_name="words")


def test_too_short_for_needles_is_a_clear_error():
    with pytest.raises(HeadwiseError, match="cannot fill"):
        tasks.generate("qa", 300, 1, 0, count_words, tokenizer_name="words")


def test_a_store_refuses_task_files_that_changed_under_the_same_ids(tmp_path):
    samples = make("passkey", n=2)
    path = tmp_path / "passkey-1024-s0.jsonl"
    tasks.check_unchanged(path, samples)  # no file yet
    tasks.write_samples(path, samples)
    tasks.check_unchanged(path, samples)
    tasks.check_unchanged(path, make("passkey", n=3))  # more samples: the first two are the same
    edited = [dataclasses.replace(samples[0], question=samples[0].question + " Be brief."), samples[1]]
    with pytest.raises(HeadwiseError, match="new --out"):
        tasks.check_unchanged(path, edited)  # e.g. a new version of the generator
