"""Benchmark tasks: deterministic, several independent questions per context, the answer really is in the context
at the stated depth and length."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import pytest

from bench_helpers import count_words
from headwise.bench import haystack, scoring, tasks
from headwise.errors import HeadwiseError


def make(task: str, length: int = 2048, n: int = 3, seed: int = 0, **kwargs) -> list[tasks.Sample]:
    return tasks.generate(task, length, n, seed, count_words, tokenizer_name="words", **kwargs)


def by_context(samples: list[tasks.Sample]) -> dict[str, list[tasks.Sample]]:
    groups: dict[str, list[tasks.Sample]] = {}
    for s in samples:
        groups.setdefault(s.context_id, []).append(s)
    return groups


def test_haystack_is_real_varied_prose():
    paragraphs = haystack.paragraphs()
    assert len(paragraphs) > 500
    assert len(set(paragraphs)) == len(paragraphs)
    assert all("\n" not in p and "::=" not in p for p in paragraphs)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generation_is_deterministic_and_varied(task):
    first, again = make(task), make(task)
    assert first == again
    groups = by_context(first)
    assert len({qs[0].context for qs in groups.values()}) == len(groups) == 3
    assert make(task, seed=1)[0].context != first[0].context
    assert list(groups) == [f"{task}-2048-s0-{i}" for i in range(3)]
    assert [s.id for s in first] == [f"{task}-2048-s0-{i}-q{j}" for i in range(3) for j in range(tasks.QUESTIONS[task])]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_questions_of_a_context_share_it_and_are_independent(task):
    for questions in by_context(make(task)).values():
        assert len({q.context for q in questions}) == 1
        assert len({q.question for q in questions}) == len(questions)
        assert len({tuple(q.answers) for q in questions}) == len(questions)
        for q in questions:
            assert q.answer_prefix and q.answer_prefix == q.answer_prefix.strip()
            for other in questions:  # no question or answer prefix gives away an answer
                assert not scoring.contains(q.answer_prefix, other.answers)
                if other is not q:
                    assert not scoring.contains(q.question, other.answers)


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [2048, 4096])
def test_answer_in_context_at_depth_and_length(task, length):
    for sample in make(task, length):
        budget = length - tasks.HEADROOM
        assert tasks.MIN_FILL * budget <= sample.token_length <= budget
        assert sample.token_length == count_words(sample.prompt)
        assert abs(sample.needle_depth - sample.depth) <= 0.12
        assert sample.context.startswith(tasks.PREAMBLES[task] + tasks.SEPARATOR)
        for answer in sample.answers:
            assert answer in sample.context
        assert scoring.score(sample.scoring, " ".join(sample.answers), sample.answers) == 1.0


def test_each_context_cycles_the_depths_from_its_own_start():
    depths = (0.2, 0.4, 0.6)
    for i, questions in enumerate(by_context(make("multikey", depths=depths)).values()):
        assert [q.depth for q in questions] == [depths[(i + j) % 3] for j in range(tasks.QUESTIONS["multikey"])]


def test_stated_depth_matches_needle_position():
    for sample in make("passkey"):
        key = sample.answers[0]
        label = re.match(r"What is the (.+)\?", sample.question).group(1)
        before = sample.context[: sample.context.index(f"The {label} is {key}.")]
        assert count_words(before) / count_words(sample.context) == pytest.approx(sample.needle_depth, abs=0.01)


def test_frequent_answer_is_the_most_frequent_word_by_an_independent_count():
    for sample in make("frequent", n=4):
        category = re.match(r"Which (\w+) is named", sample.question).group(1)
        counts = Counter(re.findall(rf"Today's {category} is (\w+)\.", sample.context))
        (top, n), (_, runner_up) = counts.most_common(2)
        assert sample.answers == [top]
        assert n > runner_up
        assert len(counts) == 1 + len(tasks.RARE)


def test_key_words_never_occur_in_the_haystack():
    text = " ".join(haystack.paragraphs()).lower()
    assert not [w for w in tasks._key_words() if re.search(rf"\b{w}\b", text)]


def test_qa_asks_about_the_note_of_the_person_it_names():
    for sample in make("qa"):
        who = re.search(r"(?:does|did) (\w+ \w+) ", sample.question).group(1)
        note = re.search(rf"{who} is an? ([\w ]+) who lives in (\w+)\.", sample.context)
        assert note is not None and sample.answers[0] in note.groups()
        assert sample.context.count(f"{who} is a") == 1  # one note per person


def test_vartrack_chain_leads_to_the_answer():
    for sample in make("vartrack", n=2):
        name = re.match(r"What is the (\w+) number\?", sample.question).group(1)
        hops = 0
        while (m := re.search(rf"The {name} number is the same as the (\w+) number\.", sample.context)) is not None:
            assert sample.context.index(f"The {m.group(1)} number is ") < m.start()  # stated before it is used
            name, hops = m.group(1), hops + 1
        assert hops == tasks.HOPS - 1
        assert f"The {name} number is {sample.answers[0]}." in sample.context


def test_jsonl_round_trip_and_plain_format(tmp_path):
    samples = make("multivalue")
    path = tasks.task_file(tmp_path, "multivalue", 2048, 0)
    tasks.write_samples(path, samples)
    assert tasks.read_samples(path) == samples
    line = json.loads(path.read_text().splitlines()[0])
    assert set(line) == {
        "id", "context_id", "task", "length", "token_length", "depth", "needle_depth", "context", "question",
        "answer_prefix", "answers", "scoring", "max_new_tokens", "seed", "tokenizer",
    }  # fmt: skip
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(HeadwiseError, match=f":{len(samples) + 1}:"):
        tasks.read_samples(path)


@pytest.mark.parametrize(
    ("args", "match"),
    [(("nope", 1024, 1), "unknown task"), (("passkey", 100, 1), "at least"), (("passkey", 1024, 0), "contexts")],
)
def test_bad_input_is_a_clear_error(args, match):
    with pytest.raises(HeadwiseError, match=match):
        tasks.generate(*args, 0, count_words, tokenizer_name="words")


def test_too_short_for_needles_is_a_clear_error():
    with pytest.raises(HeadwiseError, match="cannot fill"):
        tasks.generate("qa", 300, 1, 0, count_words, tokenizer_name="words")


def test_a_store_refuses_task_files_that_changed_under_the_same_ids(tmp_path):
    samples = make("passkey", n=2)
    path = tmp_path / "passkey-2048-s0.jsonl"
    tasks.check_unchanged(path, samples)  # no file yet
    tasks.write_samples(path, samples)
    tasks.check_unchanged(path, samples)
    tasks.check_unchanged(path, make("passkey", n=3))  # more contexts: the first two are the same
    edited = [dataclasses.replace(samples[0], question=samples[0].question + " Be brief."), *samples[1:]]
    with pytest.raises(HeadwiseError, match="new --out"):
        tasks.check_unchanged(path, edited)  # e.g. a new version of the generator
