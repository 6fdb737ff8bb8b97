"""Labels for lookback training data: is an answer in the context, or made up?

The benchmark's answers are short claims read from the context: a number, a city, a job. An answer is
*supported* when its first clause (up to the first line break or sentence end) occurs in the context, word for
word after the SQuAD normalisation of :func:`headwise.bench.scoring.normalize`, and holds at least
:data:`MIN_CHARS` letters or digits; otherwise it is *unsupported*, the contextual hallucination Lookback Lens
detects. So

- ``"57040. Remember it. 57040"`` is supported when the needle says 57040 (only ``57040`` is checked);
- a distractor's number is supported: it is in the context, though it answers another question (the label is
  about where the answer came from, not whether it is right);
- ``"New York City."``, ``"123456."`` and ``"Porto, Portugal."`` are unsupported when the context names neither
  the city, nor the number, nor Portugal;
- ``"1."`` or ``"The"`` are unsupported whatever the context: too short to have been read from it.
"""

from __future__ import annotations

import re

from headwise.bench.scoring import normalize

#: Letters and digits a clause needs before its presence in the context means it was read from there.
MIN_CHARS = 4
_CLAUSE_END = re.compile(r"[.!?;](?=\s|$)|\n")


def first_clause(text: str) -> str:
    """``text`` up to its first line break or sentence end (a period in ``3.14`` is not one)."""
    return _CLAUSE_END.split(text.strip(), maxsplit=1)[0].strip()


def supported(output: str, context: str) -> bool:
    """Whether the first clause of ``output`` occurs in ``context`` (normalised, as whole words) and is long
    enough to count (:data:`MIN_CHARS`)."""
    clause = normalize(first_clause(output))
    if sum(c.isalnum() for c in clause) < MIN_CHARS:
        return False
    return f" {clause} " in f" {normalize(context)} "
