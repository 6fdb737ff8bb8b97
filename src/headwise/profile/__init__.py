"""Per-head profiles: what each attention head does (sinks, locality, retrieval, induction, entropy).

:func:`profile_model` runs the calibration passes and returns a :class:`ProfileResult` whose
:class:`HeadProfile` is saved as JSON; :func:`write_outputs` also writes PNG heatmaps and an HTML report.

The names below load on first use, so that ``headwise --help`` (which imports :mod:`headwise.profile.cli`)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RoleThresholds": "headwise.profile.metrics",
    "ProfileResult": "headwise.profile.profiler",
    "ProfileSettings": "headwise.profile.profiler",
    "profile_model": "headwise.profile.profiler",
    "SCHEMA_VERSION": "headwise.profile.schema",
    "HeadProfile": "headwise.profile.schema",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'headwise.profile' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
