"""Scoring rules are small pure functions with documented normalization."""

from __future__ import annotations

import pytest

from headwise.bench.scoring import contains, exact_match, normalize, part_match, score
from headwise.errors import HeadwiseError


def test_normalize():
    assert normalize('  The "assert"  Statement. ') == "assert statement"
    assert normalize("An apple, a pear") == "apple pear"


def test_exact_match():
    assert exact_match("The Assert statement.", ['The "assert" statement']) == 1.0
    assert exact_match("It is 12345", ["12345"]) == 0.0


def test_contains_needs_whole_words():
    assert contains("The pass key is 12345.", ["12345"]) == 1.0
    assert contains("The pass key is 123456.", ["12345"]) == 0.0
    assert contains("nothing", ["12345", "nothing"]) == 1.0
    assert contains("anything", [""]) == 0.0


def test_part_match_is_a_fraction():
    assert part_match("AAAAA, BBBBB and DDDDD", ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]) == 0.75
    assert part_match("none", ["AAAAA"]) == 0.0
    with pytest.raises(HeadwiseError):
        part_match("x", [])


def test_score_dispatch():
    assert score("contains", "key 7", ["7"]) == 1.0
    with pytest.raises(HeadwiseError, match="unknown scoring rule"):
        score("fuzzy", "x", ["x"])
