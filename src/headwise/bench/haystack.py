"""Real prose for haystacks: the Python language reference shipped with the standard library.

``pydoc_data.topics`` holds the text of the language reference topics that ``help()`` shows (about 460 KB of
documentation prose, available offline in every CPython). It is split here into

- *paragraphs*: prose paragraphs with their hard line wraps undone; grammar blocks, code examples and
  title underlines are left out. Needle tasks sample and shuffle these per seed, so every sample has a
  different haystack (not a repeated filler sentence, unlike the original passkey test).
- *sections*: a section title (a line underlined with ``*``, ``=`` or ``-``) and the prose paragraphs
  under it. The prose-QA task builds its context from whole sections so each passage keeps its title.

Stdlib module docstrings are deliberately not used: the head profiler calibrates on them, and
benchmarking on calibration text would flatter profile-driven methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

_UNDERLINE = re.compile(r"^([*=\-])\1{2,}$")
MIN_PARAGRAPH_CHARS = 80
MAX_PARAGRAPH_CHARS = 1500


@dataclass(frozen=True)
class Section:
    """A titled section of the language reference and its prose paragraphs."""

    title: str
    paragraphs: tuple[str, ...]


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


def split_sections(text: str) -> list[Section]:
    """Split one topic's text into titled sections (a title line followed by an underline line)."""
    lines = text.splitlines()
    sections: list[Section] = []
    title: str | None = None
    body: list[str] = []

    def close() -> None:
        if title is not None:
            blocks = "\n".join(body).split("\n\n")
            sections.append(Section(title, tuple(unwrap(b) for b in blocks if is_prose(b.strip("\n")))))

    for i, line in enumerate(lines):
        if i + 1 < len(lines) and line.strip() and _UNDERLINE.match(lines[i + 1].strip()):
            close()
            title, body = line.strip(), []
        elif not _UNDERLINE.match(line.strip()):
            body.append(line)
    close()
    return sections


@cache
def sections() -> tuple[Section, ...]:
    """All sections with at least one prose paragraph and a title that no other section shares."""
    from pydoc_data.topics import topics

    found = [s for text in topics.values() for s in split_sections(text) if s.paragraphs]
    counts: dict[str, int] = {}
    for s in found:
        counts[s.title.lower()] = counts.get(s.title.lower(), 0) + 1
    return tuple(s for s in found if counts[s.title.lower()] == 1)


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
