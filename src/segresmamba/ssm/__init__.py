"""Selective state-space scan (reference and fast backends, one dispatch) and the tri-oriented Mamba layer.

Layers, lowest first: :mod:`~segresmamba.ssm.orientations` (the token orders, imports torch only);
:mod:`~segresmamba.ssm.scan_torch` (the pure-PyTorch scan) and :mod:`~segresmamba.ssm.triton` (the Triton
scan and fused ToM branches, loaded on first use); :mod:`~segresmamba.ssm.scan` (the ``scan_backend``
dispatch); :mod:`~segresmamba.ssm.tom` (the ToM layer); :mod:`~segresmamba.ssm.cuda_graphs` (ToM layers
replayed as CUDA graphs, and the Lightning callback that does so). :mod:`~segresmamba.ssm.weight_decay` gives
the optimiser groups that train A and D without weight decay. Importing this package imports no Triton.
"""

from segresmamba.ssm.orientations import ORIENTATIONS, orient, slice_deinterleave, slice_interleave, unorient
from segresmamba.ssm.scan import backend_status, register_scan_backend, scan_backends, selective_scan
from segresmamba.ssm.scan_torch import selective_scan_torch
from segresmamba.ssm.tom import TriOrientedMamba
from segresmamba.ssm.weight_decay import param_groups

__all__ = [
    "ORIENTATIONS",
    "TriOrientedMamba",
    "backend_status",
    "orient",
    "param_groups",
    "register_scan_backend",
    "scan_backends",
    "selective_scan",
    "selective_scan_torch",
    "slice_deinterleave",
    "slice_interleave",
    "unorient",
]
