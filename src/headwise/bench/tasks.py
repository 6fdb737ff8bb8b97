"""Long-context tasks generated offline and reproducibly from a seed, written as plain JSONL.

Task designs follow RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?") and the needle-in-a-haystack / passkey tests (Kamradt 2023; Mohtashami and Jaggi 2023),
with real prose as the haystack (see :mod:`headwise.bench.haystack`) instead of a repeated filler sentence:

``passkey``
    one needle, "The pass key is 71432. Remember it. 71432 is the pass key."; asked for the number.
``multikey``
    RULER's multi-key NIAH: four "One of the special magic numbers for <word> is: <7 digits>." needles
    with different key words (three are distractors); asked for one key's number.
``multivalue``
    RULER's multi-value NIAH: four needles with the same key word and different numbers; asked for all
    of them (scored by the fraction found).
``vartrack``
    RULER's variable tracking: a chain "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE." ... (four
    variables) and a distractor chain with another value; asked for every variable holding the value.
``kv``
    key-value retrieval with random identifiers (after Liu et al. 2023, "Lost in the Middle"): eight
    'key "3f9a21bc-77d0" maps to value "..."' sentences scattered through the prose; asked for one value.
``qa``
    question answering over real prose, verifiable offline: the context is a run of titled sections of
    the Python language reference (``## <title>`` then its first paragraph; the target section keeps up to
    three paragraphs). The question quotes one sentence
    of the target section (placed at the stated depth; the sentence occurs nowhere else in the corpus)
    and asks for the title of the section that contains it. The answer is the title as written in the
    text, so it needs no human labelling; the model has to locate a passage by content and read the
    header above it, i.e. retrieval plus a one-hop association over prose. The reference has about 115
    uniquely titled sections, so at 8K tokens a QA context reaches only about 7.2K tokens (``token_length``
    says so; it stays above the ``MIN_FILL`` bound).

Every context opens with a short task instruction that names no answer (the preambles of RULER's templates
and of the original passkey test), so it is fair to the question-agnostic protocol.

Lengths are measured with the model's tokenizer. A sample of target length ``L`` holds at most
``L - HEADROOM`` tokens of ``context + "\\n\\n" + question`` (``token_length``), so a chat template and the
answer still fit in an ``L``-token window; fillers are whole paragraphs, so ``token_length`` falls a
little short of that bound. Needles go in at paragraph boundaries; ``needle_depth`` is the measured token
position of the (first) target needle divided by the context's token count, ``depth`` the requested one.

JSONL format (one sample per line, UTF-8; every field plain JSON so that another library's runner can
read it without importing headwise):

``id`` (str, ``<task>-<length>-s<seed>-<index>``), ``task`` (str), ``length`` (int, target tokens),
``token_length`` (int, measured tokens of context + "\\n\\n" + question), ``depth`` (float, requested),
``needle_depth`` (float, measured), ``context`` (str), ``question`` (str), ``answers`` (list of str),
``scoring`` (str: ``exact``, ``contains`` or ``part``, see :mod:`headwise.bench.scoring`),
``max_new_tokens`` (int), ``seed`` (int), ``tokenizer`` (str, the tokenizer that measured the lengths).

The prompt is ``context + "\\n\\n" + question`` (inside the model's chat template for instruct models).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path

from headwise.bench import haystack, scoring
from headwise.errors import HeadwiseError
from headwise.report.html import write_atomic

HEADROOM = 128
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
MIN_LENGTH = 256
UNIT_FRACTION = 20
MIN_FILL = 0.85
MIN_PROSE = 0.5
SEPARATOR = "\n\n"

CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class Sample:
    """One task instance; field meanings in the module docstring."""

    id: str
    task: str
    length: int
    token_length: int
    depth: float
    needle_depth: float
    context: str
    question: str
    answers: list[str]
    scoring: str
    max_new_tokens: int
    seed: int
    tokenizer: str

    @property
    def prompt(self) -> str:
        """The text the model reads: context, a blank line, the question."""
        return self.context + SEPARATOR + self.question

    def to_json(self) -> str:
        """One JSONL line (without the newline)."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> Sample:
        """A sample from a parsed JSONL object (extra fields are ignored, a missing one raises KeyError)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Spec:
    """What a task builder returns: needles (depth, text; the target first), filler units and the question."""

    needles: list[tuple[float, str]]
    filler: list[str]
    question: str
    answers: list[str]
    scoring: str
    max_new_tokens: int


# ---------------------------------------------------------------------------------------------- builders


def _digits(rng: random.Random, n: int) -> str:
    """A random ``n``-digit number with no leading zero."""
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _name(rng: random.Random) -> str:
    """A random five-letter upper-case variable name."""
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _identifier(rng: random.Random) -> str:
    """A random hexadecimal identifier such as ``3f9a21bc-77d0``."""
    return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"


@cache
def _key_words() -> tuple[str, ...]:
    """Plain lower-case words of the corpus, used as needle keys (RULER draws keys from a word list)."""
    return tuple(sorted({w for p in haystack.paragraphs() for w in re.findall(r"\b[a-z]{6,11}\b", p)}))


def _shuffled_paragraphs(rng: random.Random) -> list[str]:
    """All haystack paragraphs in a random order (the filler of the needle tasks)."""
    units = list(haystack.paragraphs())
    rng.shuffle(units)
    return units


def _random_depths(rng: random.Random, n: int) -> list[float]:
    """``n`` uniform depths in [0, 1) for distractor needles."""
    return [rng.random() for _ in range(n)]


def build_passkey(rng: random.Random, depth: float) -> Spec:
    """Passkey retrieval: one five-digit key repeated in its needle sentence."""
    key = _digits(rng, 5)
    return Spec(
        needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
        filler=_shuffled_paragraphs(rng),
        question="What is the pass key mentioned in the text above? Answer with the number only.",
        answers=[key], scoring="contains", max_new_tokens=24,
    )


def _magic(key: str, value: str) -> str:
    """RULER's needle sentence."""
    return f"One of the special magic numbers for {key} is: {value}."


def build_multikey(rng: random.Random, depth: float) -> Spec:
    """Multi-key NIAH: the target key's number among three distractor keys' numbers."""
    keys = rng.sample(_key_words(), 4)
    values = [_digits(rng, 7) for _ in keys]
    depths = [depth, *_random_depths(rng, len(keys) - 1)]
    return Spec(
        needles=[(d, _magic(k, v)) for d, k, v in zip(depths, keys, values, strict=True)],
        filler=_shuffled_paragraphs(rng),
        question=f"What is the special magic number for {keys[0]} mentioned in the text above? "
        "Answer with the number only.",
        answers=[values[0]], scoring="contains", max_new_tokens=32,
    )


def build_multivalue(rng: random.Random, depth: float) -> Spec:
    """Multi-value NIAH: four numbers for one key, all asked for."""
    key = rng.choice(_key_words())
    values = [_digits(rng, 7) for _ in range(4)]
    depths = [depth, *_random_depths(rng, len(values) - 1)]
    return Spec(
        needles=[(d, _magic(key, v)) for d, v in zip(depths, values, strict=True)],
        filler=_shuffled_paragraphs(rng),
        question=f"What are all the special magic numbers for {key} mentioned in the text above? "
        "List every one of them.",
        answers=values, scoring="part", max_new_tokens=72,
    )


def _chain(names: Sequence[str], value: str) -> list[str]:
    """Assignment statements passing ``value`` down ``names`` in order."""
    return [f"VAR {names[0]} = {value}.", *(f"VAR {b} = VAR {a}." for a, b in pairwise(names))]


def build_vartrack(rng: random.Random, depth: float) -> Spec:
    """Variable tracking: a four-hop chain from ``depth`` to the end, and a distractor chain at random depths."""
    names = rng.sample(sorted({_name(rng) for _ in range(40)}), 8)
    value, other = _digits(rng, 5), _digits(rng, 5)
    hops = 4
    chain_depths = [depth + (1 - depth) * i / hops for i in range(hops)]
    decoy_depths = sorted(_random_depths(rng, hops))
    needles = list(zip(chain_depths, _chain(names[:hops], value), strict=True))
    needles += list(zip(decoy_depths, _chain(names[hops:], other), strict=True))
    return Spec(
        needles=needles,
        filler=_shuffled_paragraphs(rng),
        question=f"Find all variables that are assigned the value {value} in the text above, directly or "
        "through other variables. List their names.",
        answers=names[:hops], scoring="part", max_new_tokens=48,
    )


def build_kv(rng: random.Random, depth: float) -> Spec:
    """Key-value retrieval over random identifiers: one target pair and seven distractor pairs."""
    pairs = [(_identifier(rng), _identifier(rng)) for _ in range(8)]
    depths = [depth, *_random_depths(rng, len(pairs) - 1)]
    return Spec(
        needles=[(d, f'In the registry, key "{k}" maps to value "{v}".') for d, (k, v) in zip(depths, pairs,
                                                                                             strict=True)],
        filler=_shuffled_paragraphs(rng),
        question=f'What value does key "{pairs[0][0]}" map to in the registry above? Answer with the value only.',
        answers=[pairs[0][1]], scoring="contains", max_new_tokens=40,
    )


QA_PARAGRAPHS = 3


def render_section(section: haystack.Section, n_paragraphs: int) -> str:
    """A section as it appears in a QA context: a ``## title`` line and its first ``n_paragraphs`` paragraphs."""
    return f"## {section.title}{SEPARATOR}" + SEPARATOR.join(section.paragraphs[:n_paragraphs])


def _sentences(paragraph: str) -> list[str]:
    """The sentences of a paragraph that are long enough to identify it and short enough to quote."""
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if 60 <= len(s) <= 240]


@cache
def _qa_candidates() -> tuple[tuple[int, str], ...]:
    """(section index, sentence) pairs whose sentence occurs exactly once in all rendered sections and does not
    contain the section's title (quoting it in the question would give the answer away to ``contains``)."""
    corpus = "\n".join(render_section(s, QA_PARAGRAPHS) for s in haystack.sections())
    return tuple(
        (i, sentence)
        for i, section in enumerate(haystack.sections())
        for p in section.paragraphs[:QA_PARAGRAPHS]
        for sentence in _sentences(p)
        if corpus.count(sentence) == 1 and not scoring.contains(sentence, [section.title])
    )


def build_qa(rng: random.Random, depth: float) -> Spec:
    """Prose QA: name the section (placed at ``depth``) that contains a quoted sentence."""
    sections = haystack.sections()
    target, sentence = rng.choice(_qa_candidates())
    filler = [render_section(s, 1) for i, s in enumerate(sections) if i != target]
    rng.shuffle(filler)
    return Spec(
        needles=[(depth, render_section(sections[target], QA_PARAGRAPHS))],
        filler=filler,
        question=f'Which section of the documentation above contains this sentence: "{sentence}" '
        "Answer with the section title.",
        answers=[sections[target].title], scoring="contains", max_new_tokens=32,
    )


_NUMBERS_PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)
PREAMBLES = {
    "passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key afterwards.",
    "multikey": _NUMBERS_PREAMBLE,
    "multivalue": _NUMBERS_PREAMBLE,
    "vartrack": "Memorize and track the chain(s) of variable assignments hidden in the following text.",
    "kv": "A registry of keys and their values is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about it afterwards.",
    "qa": "The following text is a set of sections of the Python language reference, each under a ## title line.",
}

BUILDERS: dict[str, Callable[[random.Random, float], Spec]] = {
    "passkey": build_passkey,
    "multikey": build_multikey,
    "multivalue": build_multivalue,
    "vartrack": build_vartrack,
    "kv": build_kv,
    "qa": build_qa,
}
TASKS = tuple(BUILDERS)


# ---------------------------------------------------------------------------------------------- assembly


def _insert_needles(units: list[str], sizes: list[int], needles: list[tuple[float, str]]) -> tuple[list[str], int]:
    """Interleave needles with filler units at the boundary nearest each depth; return parts and target index."""
    total = max(sum(sizes), 1)
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    slots: dict[int, list[int]] = {}
    for n, (depth, _) in enumerate(needles):
        slot = min(range(len(bounds)), key=lambda i: abs(bounds[i] / total - depth))
        slots.setdefault(slot, []).append(n)
    parts: list[str] = []
    target = 0
    for i in range(len(units) + 1):
        for n in sorted(slots.get(i, []), key=lambda n: needles[n][0]):
            if n == 0:
                target = len(parts)
            parts.append(needles[n][1])
        if i < len(units):
            parts.append(units[i])
    return parts, target


def assemble(spec: Spec, budget: int, count_tokens: CountTokens, preamble: str) -> tuple[str, float, int]:
    """Fill prose around the needles up to ``budget`` tokens after ``preamble``; return context, measured depth,
    token length.

    Filler units longer than ``budget / UNIT_FRACTION`` tokens are skipped, so needle depths land close to
    the requested ones. Raises :class:`HeadwiseError` when the result would fall below ``MIN_FILL`` of the
    budget or hold less than ``MIN_PROSE`` of it in prose (needles too long for the length).
    """
    fixed = count_tokens(preamble + SEPARATOR + SEPARATOR + spec.question)
    fixed += sum(count_tokens(t) + 1 for _, t in spec.needles)
    units: list[str] = []
    sizes: list[int] = []
    used = fixed
    for unit in spec.filler:
        size = count_tokens(unit) + 1
        if used + size <= budget and size <= budget / UNIT_FRACTION:
            units.append(unit)
            sizes.append(size)
            used += size
    while True:
        parts, target = _insert_needles(units, sizes, spec.needles)
        parts, target = [preamble, *parts], target + 1
        context = SEPARATOR.join(parts)
        length = count_tokens(context + SEPARATOR + spec.question)
        if length <= budget or not units:
            break
        units.pop()
        sizes.pop()
    if not MIN_FILL * budget <= length <= budget or sum(sizes) < MIN_PROSE * budget:
        raise HeadwiseError(f"cannot fill {budget} tokens with this task's needles and prose (got {length}); "
                            "use another length")
    offset = len(SEPARATOR.join(parts[:target]) + SEPARATOR)
    depth = count_tokens(context[:offset]) / max(count_tokens(context), 1)
    return context, round(depth, 4), length


def generate(
    task: str,
    length: int,
    n_samples: int,
    seed: int,
    count_tokens: CountTokens,
    *,
    tokenizer_name: str,
    depths: Sequence[float] = DEFAULT_DEPTHS,
) -> list[Sample]:
    """``n_samples`` samples of ``task`` at ``length`` tokens; sample ``i`` uses ``depths[i % len(depths)]``.

    The same arguments always give the same samples (each sample's generator is seeded from
    ``seed``, ``task``, ``length`` and its index).
    """
    if task not in BUILDERS:
        raise HeadwiseError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    if length < MIN_LENGTH:
        raise HeadwiseError(f"task length must be at least {MIN_LENGTH} tokens, got {length}")
    if n_samples < 1:
        raise HeadwiseError(f"the number of samples must be at least 1, got {n_samples}")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise HeadwiseError(f"needle depths must lie in [0, 1], got {list(depths)}")
    samples = []
    for i in range(n_samples):
        depth = depths[i % len(depths)]
        spec = BUILDERS[task](random.Random(f"{seed}:{task}:{length}:{i}"), depth)
        context, needle_depth, token_length = assemble(spec, length - HEADROOM, count_tokens, PREAMBLES[task])
        samples.append(
            Sample(
                id=f"{task}-{length}-s{seed}-{i}", task=task, length=length, token_length=token_length,
                depth=depth, needle_depth=needle_depth, context=context, question=spec.question,
                answers=list(spec.answers), scoring=spec.scoring, max_new_tokens=spec.max_new_tokens,
                seed=seed, tokenizer=tokenizer_name,
            )
        )
    return samples


def token_counter(tokenizer: object) -> CountTokens:
    """Count tokens of a text with a Hugging Face tokenizer (no special tokens)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]


def task_file(folder: Path, task: str, length: int, seed: int) -> Path:
    """Where the samples of one task and length are written: ``<folder>/<task>-<length>-s<seed>.jsonl``."""
    return folder / f"{task}-{length}-s{seed}.jsonl"


def write_samples(path: Path, samples: Sequence[Sample]) -> None:
    """Write samples as JSONL, atomically."""
    write_atomic(path, "".join(s.to_json() + "\n" for s in samples))


def read_samples(path: Path) -> list[Sample]:
    """Read a task JSONL file; a malformed line is an error (task files are written whole, never appended)."""
    samples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise HeadwiseError(f"cannot read task file '{path}': {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            samples.append(Sample.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HeadwiseError(f"{path}:{number}: not a task sample ({exc})") from exc
    return samples


def check_unchanged(path: Path, samples: Sequence[Sample]) -> None:
    """Raise if ``path`` already holds a sample with one of these ids but other content.

    Result keys name a cell by task, length, seed and sample count, not by the text of its samples, so a
    results store must not outlive a change of its task files (a new generator, another tokenizer): its old
    results would pass for results on the new samples.
    """
    if not path.exists():
        return
    old = {s.id: s for s in read_samples(path)}
    changed = [s.id for s in samples if s.id in old and old[s.id] != s]
    if changed:
        raise HeadwiseError(
            f"{path} holds other samples under the same ids ({', '.join(changed[:3])}"
            f"{', ...' if len(changed) > 3 else ''}): the results next to "
            "it were computed on those. Use a new --out folder for these tasks."
        )
