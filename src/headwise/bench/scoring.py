"""Scoring rules: small pure functions from (model output, reference answers) to a score in [0, 1].

Every rule first normalizes both sides the SQuAD way (Rajpurkar et al. 2016): lower case, punctuation
removed, the articles *a*, *an*, *the* removed, whitespace collapsed. Then

``exact``
    1 if the normalized output equals one of the normalized answers, else 0.
``contains``
    1 if one of the normalized answers occurs in the normalized output, else 0 (RULER's
    ``string_match_part`` for single-answer tasks; Hsieh et al. 2024).
``part``
    the fraction of the answers that occur in the output (RULER's ``string_match_all``, used for
    multi-value needles and variable tracking: naming 3 of 4 variables scores 0.75).

A sample names its rule in its ``scoring`` field, so a peer runner can score with the same rule by name.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

from headwise.errors import HeadwiseError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "“”‘’"})


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def _occurs(answer: str, output: str) -> bool:
    """Whether the normalized ``answer`` occurs in the normalized ``output`` as whole words."""
    needle = normalize(answer)
    return bool(needle) and f" {needle} " in f" {normalize(output)} "


def exact_match(output: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized output equals one of the normalized answers."""
    return float(normalize(output) in {normalize(a) for a in answers})


def contains(output: str, answers: Sequence[str]) -> float:
    """1.0 if any answer occurs (as whole normalized words) in the output."""
    return float(any(_occurs(a, output) for a in answers))


def part_match(output: str, answers: Sequence[str]) -> float:
    """Fraction of the answers that occur (as whole normalized words) in the output."""
    if not answers:
        raise HeadwiseError("a sample scored with 'part' needs at least one answer")
    return sum(_occurs(a, output) for a in answers) / len(answers)


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact": exact_match,
    "contains": contains,
    "part": part_match,
}


def score(rule: str, output: str, answers: Sequence[str]) -> float:
    """Score ``output`` against ``answers`` with the named rule (see the module docstring)."""
    if rule not in SCORERS:
        raise HeadwiseError(f"unknown scoring rule '{rule}': use one of {', '.join(SCORERS)}")
    return SCORERS[rule](output, answers)
