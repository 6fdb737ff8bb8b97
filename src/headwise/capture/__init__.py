"""Block-wise attention capture: per-head statistics without ever holding a full n x n attention map.

Register once with :func:`register` (idempotent) and use :func:`capture` around forward passes::

    with capture(model, CaptureSettings()) as recorder:
        model(input_ids=ids, logits_to_keep=1)
    stats = recorder.layers[0]

The attention function is installed through transformers' public ``AttentionInterface`` and
``AttentionMaskInterface`` under the name ``"headwise_capture"``; the model's previous implementation is
restored when the block ends.
"""

from headwise.capture.attention import CAPTURE_NAME, capture, capture_attention, register
from headwise.capture.stats import (
    AttentionRecorder,
    CaptureSettings,
    LayerStats,
    induction_targets,
    pooled_map,
    window_mass,
)

__all__ = [
    "CAPTURE_NAME",
    "AttentionRecorder",
    "CaptureSettings",
    "LayerStats",
    "capture",
    "capture_attention",
    "induction_targets",
    "pooled_map",
    "register",
    "window_mass",
]
