"""Pure-PyTorch reference kernels (installed as ``ilm_kernels``).

These run anywhere (CPU included) and define the semantics that optimised GPU kernels
(mamba-ssm, causal-conv1d) must match:

* :mod:`ilm_kernels.ssd` -- Mamba2 SSD scan (chunked, naive loop, single step).
* :mod:`ilm_kernels.conv1d` -- causal depthwise conv1d (full sequence and single step).
* :mod:`ilm_kernels.norm` -- RMS norm and Mamba2's gated RMS norm.
"""

from .conv1d import causal_conv1d_reference, causal_conv1d_step
from .norm import gated_rms_norm, rms_norm
from .ops import (
    causal_conv1d,
    causal_conv1d_step_op,
    gated_rms_norm_op,
    rms_norm_op,
    ssd_step_op,
)
from .ssd import segsum, ssd_naive, ssd_scan_reference, ssd_step
from .ssd_scan import ssd_scan

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step_op",
    "gated_rms_norm_op",
    "rms_norm_op",
    "ssd_step_op",
    "causal_conv1d_reference",
    "causal_conv1d_step",
    "gated_rms_norm",
    "rms_norm",
    "segsum",
    "ssd_naive",
    "ssd_scan",
    "ssd_scan_reference",
    "ssd_step",
]
