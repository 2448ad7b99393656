"""Selective state-space scan (reference and fast backends, one dispatch) and the tri-oriented Mamba layer."""

from segresmamba.ssm import scan_triton as _scan_triton  # noqa: F401  (registers scan_backend="triton", lazily)
from segresmamba.ssm.scan import backend_status, register_scan_backend, scan_backends, selective_scan
from segresmamba.ssm.scan_torch import selective_scan_torch
from segresmamba.ssm.tom import TriOrientedMamba, slice_deinterleave, slice_interleave

__all__ = [
    "TriOrientedMamba",
    "backend_status",
    "register_scan_backend",
    "scan_backends",
    "selective_scan",
    "selective_scan_torch",
    "slice_deinterleave",
    "slice_interleave",
]
