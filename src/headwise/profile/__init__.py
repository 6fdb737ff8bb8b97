"""Per-head profiles: what each attention head does (sinks, locality, retrieval, induction, entropy).

:func:`profile_model` runs the calibration passes and returns a :class:`ProfileResult` whose
:class:`HeadProfile` is saved as JSON; :func:`write_outputs` also writes PNG heatmaps and an HTML report.
"""

from headwise.profile.metrics import RoleThresholds
from headwise.profile.profiler import ProfileResult, ProfileSettings, profile_model
from headwise.profile.schema import SCHEMA_VERSION, HeadProfile

__all__ = ["SCHEMA_VERSION", "HeadProfile", "ProfileResult", "ProfileSettings", "RoleThresholds", "profile_model"]
