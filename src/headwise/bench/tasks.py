"""Long-context tasks generated offline and reproducibly from a seed, written as plain JSONL.

Every context carries one or more independent questions (:data:`QUESTIONS`), each aimed at its own needle(s), so
one prefill of the context (compressed once, question-agnostic) answers all of them; no question names another's
answer. Task designs follow RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?") and the needle-in-a-haystack / passkey tests (Kamradt 2023; Mohtashami and Jaggi 2023),
with real prose as the haystack (see :mod:`headwise.bench.haystack`) instead of a repeated filler sentence.
Needle keys are words that never occur in that prose (:data:`CATEGORIES`), so the prose does not compete with
the needles. They are calibrated so that a small model with the full cache can answer (issue 13): redundant
needle sentences, short chains, questions that echo the needle's wording, and an answer prefix per question
("The door code is"), as RULER's templates have, which opens the model's turn in the needle's words so that a
small model answers instead of drifting into the haystack's topic.

``passkey`` (single-needle retrieval)
    needles "The door code is 71432. Remember it. 71432 is the door code." under different labels;
    each question asks for one label's number.
``multikey`` (retrieval with distractors)
    RULER's multi-key NIAH: "The special magic number for <key> is <5 digits>." needles
    (one per question) of the same form, keys from different categories; each question asks for one key's
    number, the other needles are its distractors.
``multivalue`` (multi-needle retrieval)
    RULER's multi-value NIAH: keys with two numbers each ("One of the special magic numbers for <key>
    is: <7 digits>. Remember it. ..."); each question asks for all the numbers of one key (scored by the
    fraction found).
``vartrack`` (multi-hop tracing)
    RULER's variable tracking, shortened and in words: chains "The tiger number is 12345.
    Remember it. 12345 is the tiger number. The plum number is the same as the tiger number." (:data:`HOPS`
    numbers each, named by key words, side by side); each question asks for a chain's last number ("What is
    the plum number?").
``kv`` (retrieval with hard distractors)
    key-value retrieval with random identifiers (after Liu et al. 2023, "Lost in the Middle"): eight
    'key "3f9a21bc-77d0" maps to value "..."' sentences scattered through the prose; some are asked for.
``qa`` (a question about a passage)
    a short note about a person per question ("Marta Novak is a baker who lives in Lisbon. Marta Novak has lived
    in Lisbon for many years, working as a baker."); each question asks for one person's city or job, so the
    answer is read from a passage, in the passage's own words, among facts of the same kind about others.
``frequent`` (aggregation)
    frequent-word extraction, after RULER's common words: in each of one or more categories, one word is named
    :data:`FREQUENT` times ("Today's fruit is plum.") and others :data:`RARE` times, at random depths;
    each question asks for one category's most frequent word.

Every context opens with a short task instruction that names no answer (the preambles of RULER's templates
and of the original passkey test), so it is fair to the question-agnostic protocol.

Lengths are measured with the model's tokenizer. A question of target length ``L`` holds at most
``L - HEADROOM`` tokens of ``context + "\\n\\n" + question`` (``token_length``), so a chat template and the
answer still fit in an ``L``-token window; fillers are whole paragraphs, so ``token_length`` falls a
little short of that bound. Needles go in at paragraph boundaries. Context ``i`` puts its ``j``-th target
needle at ``depths[(i + j) % len(depths)]`` (``depth``, requested); ``needle_depth`` is the measured token
position of the question's target needle divided by the context's token count.

JSONL format (one question per line, the questions of a context on consecutive lines, UTF-8; every field
plain JSON so that another library's runner can read it without importing headwise):

``id`` (str, ``<context_id>-q<j>``), ``context_id`` (str, ``<task>-<length>-s<seed>-<index>``; every question
of a context carries the identical ``context``), ``task`` (str), ``length`` (int, target tokens),
``token_length`` (int, measured tokens of context + "\\n\\n" + question), ``depth`` (float, requested),
``needle_depth`` (float, measured), ``context`` (str), ``question`` (str), ``answer_prefix`` (str, the start of
the answer, fed after the question as the model's own words; see :mod:`headwise.bench.protocol`), ``answers``
(list of str),
``scoring`` (str: ``exact``, ``contains`` or ``part``, see :mod:`headwise.bench.scoring`),
``max_new_tokens`` (int), ``seed`` (int), ``tokenizer`` (str, the tokenizer that measured the lengths).

The prompt is ``context + "\\n\\n" + question`` (inside the model's chat template for instruct models), then
the answer prefix.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

from headwise.bench import haystack
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
    """One question on one context; field meanings in the module docstring."""

    id: str
    context_id: str
    task: str
    length: int
    token_length: int
    depth: float
    needle_depth: float
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    scoring: str
    max_new_tokens: int
    seed: int
    tokenizer: str

    @property
    def prompt(self) -> str:
        """The text the model reads: context, a blank line, the question (the answer prefix follows it in the
        model's own turn, see :mod:`headwise.bench.protocol`)."""
        return self.context + SEPARATOR + self.question

    def to_json(self) -> str:
        """One JSONL line (without the newline)."""
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> Sample:
        """A sample from a parsed JSONL object (extra fields are ignored, a missing one raises KeyError)."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Question:
    """One question of a context: its text, the start of its answer, answers, scoring rule, decode budget and the
    needle it targets (an index into :attr:`Spec.needles`; that needle's depth is the question's depth)."""

    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    scoring: str
    max_new_tokens: int
    needle: int


@dataclass(frozen=True)
class Spec:
    """What a task builder returns: needles (depth, text), filler units and the context's questions."""

    needles: list[tuple[float, str]]
    filler: list[str]
    questions: list[Question]


Depths = Callable[[int], float]
"""The requested depth of a context's ``j``-th target needle."""


# ---------------------------------------------------------------------------------------------- builders


def _digits(rng: random.Random, n: int) -> str:
    """A random ``n``-digit number with no leading zero."""
    return str(rng.randrange(10 ** (n - 1), 10**n))


def _distinct(rng: random.Random, make: Callable[[], str], n: int) -> list[str]:
    """``n`` different values drawn with ``make`` (so no two questions of a context share an answer)."""
    found: list[str] = []
    while len(found) < n:
        value = make()
        if value not in found:
            found.append(value)
    return found


def _identifier(rng: random.Random) -> str:
    """A random hexadecimal identifier such as ``3f9a21bc-77d0``."""
    return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"


def _key_words() -> tuple[str, ...]:
    """Needle keys: the category words, none of which occurs in the haystack prose (a key that the prose also
    uses would compete with the needle for the model's attention)."""
    return tuple(sorted(w for words in CATEGORIES.values() for w in words))


def _keys(rng: random.Random, n: int) -> list[str]:
    """``n`` needle keys from different categories while there are enough (a tiger and a sheep are easier to
    confuse than a tiger and a plum), then any others."""
    firsts = [rng.choice(CATEGORIES[c]) for c in rng.sample(sorted(CATEGORIES), min(n, len(CATEGORIES)))]
    return firsts + rng.sample(sorted(set(_key_words()) - set(firsts)), n - len(firsts))


def _shuffled_paragraphs(rng: random.Random) -> list[str]:
    """All haystack paragraphs in a random order (the filler of the needle tasks)."""
    units = list(haystack.paragraphs())
    rng.shuffle(units)
    return units


def _random_depths(rng: random.Random, n: int) -> list[float]:
    """``n`` uniform depths in [0, 1) for distractor needles."""
    return [rng.random() for _ in range(n)]


QUESTIONS: dict[str, int] = {
    "passkey": 2,
    "multikey": 2,
    "multivalue": 2,
    "vartrack": 1,
    "kv": 2,
    "qa": 1,
    "frequent": 1,
}
"""Questions per context, per task (each targets its own needles, so each is answerable alone). At most two:
with several needles of one form SmolLM2-135M's full cache often answers an early needle's question with a
later needle's value (passkey at 4K: 0.71 with four questions per context, 0.92 with two; multikey at 2K: 0.71
and 1.00). One for the tasks whose second chain, note or category did the same at 2K (vartrack 0.75 with two
chains, 1.00 with one; qa 0.83 and 0.92; calibration seed, see BENCHMARKS.md)."""

CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "brown", "pink"),
    "animal": ("cat", "dog", "horse", "tiger", "rabbit", "eagle", "whale", "sheep"),
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"),
    "bird": ("robin", "sparrow", "owl", "crow", "swan", "heron", "parrot", "finch"),
    "metal": ("gold", "silver", "copper", "iron", "tin", "zinc", "nickel", "cobalt"),
}


PASSKEY_LABELS = (
    "door code",
    "room number",
    "bank PIN",
    "locker combination",
    "phone extension",
    "ticket serial",
    "order reference",
)


def build_passkey(rng: random.Random, depth: Depths) -> Spec:
    """Single-needle retrieval: passkey needles under different labels (:data:`QUESTIONS`), each asked for alone."""
    n = QUESTIONS["passkey"]
    labels = rng.sample(PASSKEY_LABELS, n)
    keys = _distinct(rng, lambda: _digits(rng, 5), n)
    pairs = list(enumerate(zip(labels, keys, strict=True)))
    return Spec(
        needles=[(depth(j), f"The {label} is {key}. Remember it. {key} is the {label}.") for j, (label, key) in pairs],
        filler=_shuffled_paragraphs(rng),
        questions=[
            Question(f"What is the {label}? Answer with the number only.", f"The {label} is", (key,), "contains", 16,
                     j)
            for j, (label, key) in pairs
        ],
    )


def _magic(key: str, value: str, *, unique: bool) -> str:
    """RULER's needle sentence. ``unique`` for a key with one number: plain and worded as the answer will be ("The
    special magic number for <key> is ..."; with the redundant form below, SmolLM2-135M's full cache more often
    drops a digit or answers an earlier needle's question with this one's number). Otherwise repeated
    backwards."""
    if unique:
        return f"The special magic number for {key} is {value}."
    return (
        f"One of the special magic numbers for {key} is: {value}. Remember it. "
        f"{value} is a special magic number for {key}."
    )


MULTIKEY_DIGITS = 5
"""Digits of a multikey number: five, not RULER's seven, since SmolLM2-135M's full cache drops a digit of a
seven-digit number now and then (one answer in 24 on the calibration seed at 2K)."""


def build_multikey(rng: random.Random, depth: Depths) -> Spec:
    """Multi-key NIAH: one key's number per question, in the same sentence form; each question asks for one key,
    the other needles are its distractors."""
    keys = _keys(rng, QUESTIONS["multikey"])
    values = _distinct(rng, lambda: _digits(rng, MULTIKEY_DIGITS), QUESTIONS["multikey"])
    return Spec(
        needles=[(depth(j), _magic(k, v, unique=True)) for j, (k, v) in enumerate(zip(keys, values, strict=True))],
        filler=_shuffled_paragraphs(rng),
        questions=[
            Question(
                f"What is the special magic number for {k}? Answer with the number only.",
                f"The special magic number for {k} is",
                (v,),
                "contains",
                24,
                j,
            )
            for j, (k, v) in enumerate(zip(keys, values, strict=True))
        ],
    )


MULTIVALUE_VALUES = 2


def build_multivalue(rng: random.Random, depth: Depths) -> Spec:
    """Multi-value NIAH: a key per question with two numbers each (the second at a random depth); each question
    asks for all the numbers of one key."""
    keys = _keys(rng, QUESTIONS["multivalue"])
    values = _distinct(rng, lambda: _digits(rng, 7), QUESTIONS["multivalue"] * MULTIVALUE_VALUES)
    needles, questions = [], []
    for j, key in enumerate(keys):
        mine = values[j * MULTIVALUE_VALUES : (j + 1) * MULTIVALUE_VALUES]
        questions.append(
            Question(
                f"What are all the special magic numbers for {key}? Answer with the numbers only.",
                f"The special magic numbers for {key} are",
                tuple(mine),
                "part",
                40,
                len(needles),
            )
        )
        depths = [depth(j), *_random_depths(rng, MULTIVALUE_VALUES - 1)]
        needles += [(d, _magic(key, v, unique=False)) for d, v in zip(depths, mine, strict=True)]
    return Spec(needles=needles, filler=_shuffled_paragraphs(rng), questions=questions)


def _chain(names: Sequence[str], value: str) -> str:
    """A chain's statements side by side: the first number given (redundantly, as passkey's needle is), each next
    one the same as the one before."""
    first = names[0]
    return " ".join([
        f"The {first} number is {value}. Remember it. {value} is the {first} number.",
        *(f"The {b} number is the same as the {a} number." for a, b in pairwise(names)),
    ])


HOPS = 2


def build_vartrack(rng: random.Random, depth: Depths) -> Spec:
    """Variable tracking in words: a chain per question of :data:`HOPS` numbers named by key words, its statements
    side by side at its depth; each question asks for one chain's last number."""
    n = QUESTIONS["vartrack"]
    names = _keys(rng, n * HOPS)
    values = _distinct(rng, lambda: _digits(rng, 5), n)
    chains = [names[j * HOPS : (j + 1) * HOPS] for j in range(n)]
    return Spec(
        needles=[(depth(j), _chain(chain, value)) for j, (chain, value) in enumerate(zip(chains, values, strict=True))],
        filler=_shuffled_paragraphs(rng),
        questions=[
            Question(f"What is the {chain[-1]} number? Answer with the number only.", f"The {chain[-1]} number is",
                     (value,), "contains", 16, j)
            for j, (chain, value) in enumerate(zip(chains, values, strict=True))
        ],
    )


KV_PAIRS = 8


def build_kv(rng: random.Random, depth: Depths) -> Spec:
    """Key-value retrieval over random identifiers: eight pairs, :data:`QUESTIONS` of them asked for (one each)."""
    pairs = [(_identifier(rng), _identifier(rng)) for _ in range(KV_PAIRS)]
    n = QUESTIONS["kv"]
    depths = [depth(j) for j in range(n)] + _random_depths(rng, KV_PAIRS - n)
    return Spec(
        needles=[
            (d, f'In the registry, key "{k}" maps to value "{v}".') for d, (k, v) in zip(depths, pairs, strict=True)
        ],
        filler=_shuffled_paragraphs(rng),
        questions=[
            Question(
                f'What value does key "{k}" map to in the registry above? Answer with the value only.',
                f'Key "{k}" maps to value "',
                (v,),
                "contains",
                24,
                j,
            )
            for j, (k, v) in enumerate(pairs[:n])
        ],
    )


FIRST_NAMES = ("Marta", "Jonas", "Ingrid", "Tomas", "Elena", "Pavel", "Greta", "Oskar", "Lucia", "Anders", "Mirela",
               "Kasper")
LAST_NAMES = ("Lindqvist", "Novak", "Halvorsen", "Berger", "Castell", "Dragan", "Moreau", "Keller", "Rasmussen",
              "Ferrant")
CITIES = ("Tromso", "Lisbon", "Krakow", "Dublin", "Valencia", "Tallinn", "Bergen", "Porto", "Ghent", "Turin", "Riga",
          "Lyon")
JOBS = ("lighthouse keeper", "baker", "violin maker", "ferry captain", "beekeeper", "watchmaker", "glassblower",
        "librarian")


def build_qa(rng: random.Random, depth: Depths) -> Spec:
    """A question about a passage: a short note per question about a different person, at its depth, saying where
    they live and what they work as (each fact twice, in other words); each question asks for one person's city
    or job."""
    n = QUESTIONS["qa"]
    people = [f"{f} {s}" for f, s in zip(rng.sample(FIRST_NAMES, n), rng.sample(LAST_NAMES, n), strict=True)]
    cities, jobs = rng.sample(CITIES, n), rng.sample(JOBS, n)
    needles, questions = [], []
    for j, (who, city, job) in enumerate(zip(people, cities, jobs, strict=True)):
        needles.append((depth(j), f"{who} is a {job} who lives in {city}. {who} has lived in {city} for many years, "
                                  f"working as a {job}."))
        if rng.random() < 0.5:
            asked = (f"In which city does {who} live? Answer with the city only.", f"{who} lives in", city)
        else:
            asked = (f"What does {who} work as? Answer with the job only.", f"{who} is a", job)
        questions.append(Question(asked[0], asked[1], (asked[2],), "contains", 16, j))
    return Spec(needles=needles, filler=_shuffled_paragraphs(rng), questions=questions)


FREQUENT = 5
RARE = (1, 1)


def frequent_needle(category: str, word: str) -> str:
    """The sentence that names ``word`` once for the ``frequent`` task."""
    return f"Today's {category} is {word}."


def build_frequent(rng: random.Random, depth: Depths) -> Spec:
    """Aggregation (frequent-word extraction, after RULER's common words): in a category per question one word is
    named :data:`FREQUENT` times and others fewer (:data:`RARE`); each question asks for one category's most
    frequent word. One naming of the frequent word sits at the question's depth, every other at random."""
    needles, questions = [], []
    for j, category in enumerate(rng.sample(sorted(CATEGORIES), QUESTIONS["frequent"])):
        top, *others = rng.sample(CATEGORIES[category], 1 + len(RARE))
        questions.append(
            Question(
                f"Which {category} is named most often as today's {category}? Answer with the {category} only.",
                f"The {category} named most often as today's {category} is",
                (top,),
                "contains",
                12,
                len(needles),
            )
        )
        depths = [depth(j), *_random_depths(rng, FREQUENT - 1)]
        needles += [(d, frequent_needle(category, top)) for d in depths]
        needles += [
            (rng.random(), frequent_needle(category, w)) for w, n in zip(others, RARE, strict=True) for _ in range(n)
        ]
    return Spec(needles=needles, filler=_shuffled_paragraphs(rng), questions=questions)


_NUMBERS_PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)
PREAMBLES = {
    "passkey": "A pass key and some secret words are hidden inside a lot of irrelevant text. Find them and "
    "memorize them. I will quiz you about them afterwards.",
    "multikey": _NUMBERS_PREAMBLE,
    "multivalue": _NUMBERS_PREAMBLE,
    "vartrack": "Variable assignments are hidden in the following text, some variables set from others. Track the "
    "value of every variable. I will quiz you about them afterwards.",
    "kv": "A registry of keys and their values is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about it afterwards.",
    "qa": "Short notes about some people are hidden inside a lot of irrelevant text. Read them carefully. I will ask "
    "you about the people afterwards.",
    "frequent": "Sentences naming today's color, animal, fruit, bird or metal are hidden within the "
    "following text, some more often than others. Keep count of them. I will quiz you about them afterwards.",
}

BUILDERS: dict[str, Callable[[random.Random, Depths], Spec]] = {
    "passkey": build_passkey,
    "multikey": build_multikey,
    "multivalue": build_multivalue,
    "vartrack": build_vartrack,
    "kv": build_kv,
    "qa": build_qa,
    "frequent": build_frequent,
}
TASKS = tuple(BUILDERS)


# ---------------------------------------------------------------------------------------------- assembly


def _insert_needles(
    units: list[str], sizes: list[int], needles: list[tuple[float, str]]
) -> tuple[list[str], list[int]]:
    """Interleave needles with filler units at the boundary nearest each depth; return the parts and each
    needle's index among them."""
    total = max(sum(sizes), 1)
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    slots: dict[int, list[int]] = {}
    for n, (depth, _) in enumerate(needles):
        slot = min(range(len(bounds)), key=lambda i: abs(bounds[i] / total - depth))
        slots.setdefault(slot, []).append(n)
    parts: list[str] = []
    where = [0] * len(needles)
    for i in range(len(units) + 1):
        for n in sorted(slots.get(i, []), key=lambda n: needles[n][0]):
            where[n] = len(parts)
            parts.append(needles[n][1])
        if i < len(units):
            parts.append(units[i])
    return parts, where


@dataclass(frozen=True)
class Assembled:
    """A context: its text, the measured depth of each targeted needle, and each question's token length."""

    context: str
    needle_depths: dict[int, float]
    token_lengths: list[int]


def assemble(spec: Spec, budget: int, count_tokens: CountTokens, preamble: str) -> Assembled:
    """Fill prose around the needles up to ``budget`` tokens after ``preamble`` (with the longest question).

    Filler units longer than ``budget / UNIT_FRACTION`` tokens are skipped, so needle depths land close to
    the requested ones. Raises :class:`HeadwiseError` when the result would fall below ``MIN_FILL`` of the
    budget or hold less than ``MIN_PROSE`` of it in prose (needles too long for the length).
    """
    longest = max((q.question for q in spec.questions), key=lambda q: count_tokens(SEPARATOR + q))
    fixed = count_tokens(preamble + SEPARATOR + SEPARATOR + longest)
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
        parts, where = _insert_needles(units, sizes, spec.needles)
        parts, where = [preamble, *parts], [w + 1 for w in where]
        context = SEPARATOR.join(parts)
        length = count_tokens(context + SEPARATOR + longest)
        if length <= budget or not units:
            break
        units.pop()
        sizes.pop()
    if not MIN_FILL * budget <= length <= budget or sum(sizes) < MIN_PROSE * budget:
        raise HeadwiseError(
            f"cannot fill {budget} tokens with this task's needles and prose (got {length}); use another length"
        )
    total = max(count_tokens(context), 1)
    depths = {}
    for q in spec.questions:
        offset = len(SEPARATOR.join(parts[: where[q.needle]]) + SEPARATOR)
        depths[q.needle] = round(count_tokens(context[:offset]) / total, 4)
    lengths = [count_tokens(context + SEPARATOR + q.question) for q in spec.questions]
    return Assembled(context, depths, lengths)


def _rotated(depths: Sequence[float], i: int) -> Depths:
    """Context ``i``'s target depths: ``depths`` cycled from its ``i``-th entry."""
    return lambda j: depths[(i + j) % len(depths)]


def generate(
    task: str,
    length: int,
    n_contexts: int,
    seed: int,
    count_tokens: CountTokens,
    *,
    tokenizer_name: str,
    depths: Sequence[float] = DEFAULT_DEPTHS,
) -> list[Sample]:
    """The questions of ``n_contexts`` contexts of ``task`` at ``length`` tokens, context by context, in order.

    Context ``i`` puts its ``j``-th target needle at ``depths[(i + j) % len(depths)]``. The same arguments
    always give the same questions (each context's generator is seeded from ``seed``, ``task``, ``length`` and
    its index).
    """
    if task not in BUILDERS:
        raise HeadwiseError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    if length < MIN_LENGTH:
        raise HeadwiseError(f"task length must be at least {MIN_LENGTH} tokens, got {length}")
    if n_contexts < 1:
        raise HeadwiseError(f"the number of contexts must be at least 1, got {n_contexts}")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise HeadwiseError(f"needle depths must lie in [0, 1], got {list(depths)}")
    samples = []
    for i in range(n_contexts):
        spec = BUILDERS[task](random.Random(f"{seed}:{task}:{length}:{i}"), _rotated(depths, i))
        built = assemble(spec, length - HEADROOM, count_tokens, PREAMBLES[task])
        context_id = f"{task}-{length}-s{seed}-{i}"
        for j, (q, token_length) in enumerate(zip(spec.questions, built.token_lengths, strict=True)):
            samples.append(
                Sample(
                    id=f"{context_id}-q{j}",
                    context_id=context_id,
                    task=task,
                    length=length,
                    token_length=token_length,
                    depth=spec.needles[q.needle][0],
                    needle_depth=built.needle_depths[q.needle],
                    context=built.context,
                    question=q.question,
                    answer_prefix=q.answer_prefix,
                    answers=list(q.answers),
                    scoring=q.scoring,
                    max_new_tokens=q.max_new_tokens,
                    seed=seed,
                    tokenizer=tokenizer_name,
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
