"""Calibration inputs, built offline and reproducibly from a seed.

- *Prose*: paragraphs of the docstrings of a fixed list of Python standard-library modules (and their public
  classes and functions), read with :func:`inspect.getdoc` and shuffled with the seed. ``pydoc_data.topics``
  is deliberately not used: the benchmark draws its haystacks from it. The exact text depends on the Python
  version, so profiles name it in their settings.
- *Needles*: a random fact "The secret number of the <adjective> <noun> is <digits>." inserted at a random
  depth, with a question that asks for it (needle-in-a-haystack, as in Wu et al. 2024).
- *Repeated random tokens*: a random token sequence shown twice, the standard probe for previous-token and
  induction heads (Olsson et al. 2022).
"""

from __future__ import annotations

import importlib
import inspect
import random
import sys
from dataclasses import dataclass

from headwise.errors import HeadwiseError

STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "asyncio", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "gettext", "glob",
    "heapq", "hashlib", "http.client", "http.server", "imaplib", "inspect", "ipaddress", "itertools", "json",
    "logging", "mailbox", "multiprocessing", "numbers", "optparse", "pathlib", "pickle", "queue", "random",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tkinter", "tokenize", "traceback",
    "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref",
    "xml.dom.minidom", "zipfile",
)  # fmt: skip

ADJECTIVES = ("amber", "silent", "crooked", "velvet", "northern", "hollow", "copper", "restless", "frozen", "gentle")
NOUNS = ("lantern", "harbor", "orchard", "compass", "falcon", "library", "glacier", "violin", "meadow", "tower")


def _is_prose(paragraph: str) -> bool:
    """Whether a docstring paragraph reads as sentences rather than code, tables or signatures."""
    if len(paragraph) < 120 or paragraph.lstrip().startswith((">>>", "...", "-", "*", "|")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) > 0.9 and paragraph.count(".") >= 1


def stdlib_paragraphs() -> list[str]:
    """Prose paragraphs from the docstrings of :data:`STDLIB_MODULES`, in a fixed order, duplicates removed."""
    seen: set[str] = set()
    out: list[str] = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [
            obj for attr, obj in sorted(vars(module).items())
            if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__
            and (inspect.isclass(obj) or inspect.isfunction(obj))
        ]
        for obj in objects:
            for para in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(para.split())
                if _is_prose(text) and text not in seen:
                    seen.add(text)
                    out.append(text)
    if not out:
        raise HeadwiseError("no standard-library docstrings found (is Python run with -OO?)")
    return out


def haystack(tokenizer, n_tokens: int, rng: random.Random) -> list[str]:
    """Shuffled prose paragraphs whose joined text has at least ``n_tokens`` tokens (cycling if needed)."""
    paragraphs = stdlib_paragraphs()
    order = rng.sample(paragraphs, len(paragraphs))
    chosen: list[str] = []
    tokens = 0
    while tokens < n_tokens:
        para = order[len(chosen) % len(order)]
        chosen.append(para)
        tokens += len(tokenizer(para, add_special_tokens=False)["input_ids"]) + 1
    return chosen


def prose_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """``n_tokens`` token ids of shuffled standard-library prose (with the BOS token when the model has one)."""
    text = "\n\n".join(haystack(tokenizer, n_tokens, random.Random(seed)))
    ids = tokenizer(text)["input_ids"]
    return list(ids[:n_tokens])


def repeated_random_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """A random sequence of real prose tokens shown twice (plus BOS when the model has one), ``n_tokens`` long."""
    vocab = sorted(set(prose_ids(tokenizer, 4096, seed)) - set(tokenizer.all_special_ids))
    rng = random.Random(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    half = rng.choices(vocab, k=(n_tokens - len(bos)) // 2)
    return bos + half + half


@dataclass(frozen=True)
class NeedleTask:
    """One needle-in-a-haystack prompt: its token ids, where the needle value sits, and the expected answer."""

    ids: list[int]
    needle_positions: list[int]
    answer: str
    depth: float
    seed: int


def needle_task(tokenizer, n_tokens: int, seed: int, *, chat: bool) -> NeedleTask:
    """A prompt of about ``n_tokens`` tokens with a random numeric fact hidden at a random depth.

    Instruct models (``chat``) get the chat template; base models get a completion prompt ending in
    "... is", so both answer by copying the number. ``needle_positions`` are the token positions of the
    number's characters in the prompt.
    """
    rng = random.Random(seed)
    subject = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    answer = str(rng.randrange(10**6, 10**7))
    needle = f"The secret number of the {subject} is {answer}."
    question = f"What is the secret number of the {subject}?"
    paragraphs = haystack(tokenizer, max(n_tokens - 80, 16), rng)
    depth = rng.uniform(0.1, 0.9)
    paragraphs.insert(round(depth * len(paragraphs)), needle)
    body = "\n\n".join(paragraphs)
    if chat:
        user = f"{body}\n\nQuestion: {question} Answer with the number only."
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    else:
        text = f"{body}\n\nQuestion: {question}\nAnswer: The secret number of the {subject} is"
        enc = tokenizer(text, return_offsets_mapping=True)
    start = text.index(needle) + needle.index(answer)
    stop = start + len(answer)
    positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= start and b <= stop]
    if not positions:
        name = type(tokenizer).__name__
        raise HeadwiseError(f"could not locate the needle's tokens in the prompt (tokenizer {name})")
    return NeedleTask(list(enc["input_ids"]), positions, answer, depth, seed)


def python_version() -> str:
    """The Python version whose docstrings made the prose (part of a profile's settings)."""
    return ".".join(map(str, sys.version_info[:3]))
