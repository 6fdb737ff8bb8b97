"""Compression policies, one per file, and the registry that names them.

Add a method: write ``policies/<name>.py`` with a :class:`~headwise.policies.base.Policy` dataclass
subclass (options as fields, a ``score`` and, if it reads attention, ``queries_needed`` and ``accumulate``),
then add the class to ``POLICIES`` below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from headwise.errors import HeadwiseError
from headwise.policies.a2sf import A2SF
from headwise.policies.base import Policy
from headwise.policies.full import Full
from headwise.policies.h2o import H2O
from headwise.policies.headwise import HeadAware
from headwise.policies.keydiff import KeyDiff
from headwise.policies.knorm import Knorm
from headwise.policies.kvzip import KVzip
from headwise.policies.random import Random
from headwise.policies.snapkv import SnapKV
from headwise.policies.streaming_llm import StreamingLLM
from headwise.policies.tova import TOVA

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Full, Random, StreamingLLM, H2O, A2SF, SnapKV, TOVA, Knorm, KeyDiff, KVzip,
                              HeadAware)
}


def register(cls: type[Policy]) -> type[Policy]:
    """Register a policy class under its ``name`` (usable as a decorator)."""
    POLICIES[cls.name] = cls
    return cls


def option_names(cls: type[Policy]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def make_policy(name: str, options: dict[str, Any] | None = None) -> Policy:
    """Build a policy by name with its options, with a clear error for an unknown name or option."""
    if name not in POLICIES:
        raise HeadwiseError(f"unknown policy '{name}'; available: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(option_names(cls)))
    if unknown:
        raise HeadwiseError(
            f"unknown option(s) {', '.join(unknown)} for policy '{name}'; it takes: {', '.join(option_names(cls))}"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise HeadwiseError(str(exc)) from exc


__all__ = ["POLICIES", "Policy", "make_policy", "option_names", "register"]
