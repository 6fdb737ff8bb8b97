"""Real prose for haystacks: the Python language reference shipped with the standard library.

``pydoc_data.topics`` holds the text of the language reference topics that ``help()`` shows (about 460 KB of
documentation prose, available offline in every CPython). Its prose paragraphs (hard line wraps undone; grammar
blocks, code examples and title underlines left out) are the filler of every task: tasks sample and shuffle them
per seed, so every sample has a different haystack (not a repeated filler sentence, unlike the original passkey
test).

Stdlib module docstrings are deliberately not used: the head profiler calibrates on them, and
benchmarking on calibration text would flatter profile-driven methods.
"""

from __future__ import annotations

import re
from functools import cache

_UNDERLINE = re.compile(r"^([*=\-])\1{2,}$")
MIN_PARAGRAPH_CHARS = 80
MAX_PARAGRAPH_CHARS = 1500


def is_prose(block: str) -> bool:
    """Whether a blank-line separated block is a prose paragraph (not code, grammar, a title or a table)."""
    first = block.lstrip("\n").split("\n", 1)[0]
    return (
        MIN_PARAGRAPH_CHARS <= len(block) <= MAX_PARAGRAPH_CHARS
        and (first[:1].isalpha() or first.startswith("* "))
        and "::=" not in block
        and ">>>" not in block
        and not any(_UNDERLINE.match(line.strip()) for line in block.splitlines())
    )


def unwrap(block: str) -> str:
    """Join a hard-wrapped paragraph into one line with single spaces."""
    return " ".join(block.split())


@cache
def paragraphs() -> tuple[str, ...]:
    """Every distinct prose paragraph of the language reference topics, unwrapped, in a fixed order."""
    from pydoc_data.topics import topics

    seen: dict[str, None] = {}
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            if is_prose(block.strip("\n")):
                seen.setdefault(unwrap(block), None)
    return tuple(seen)
