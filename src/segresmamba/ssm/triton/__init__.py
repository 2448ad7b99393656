"""The suite's Triton implementation of the selective scan (``scan_backend="triton"``) and of the ToM
layer's fused branches, one concern per module:

- :mod:`~segresmamba.ssm.triton.reference`: the chunked algorithm in plain PyTorch, the kernels'
  specification and oracle (no Triton needed);
- :mod:`~segresmamba.ssm.triton.kernels`: the ``@triton.jit`` kernels, nothing else;
- :mod:`~segresmamba.ssm.triton.tuning`: the launch settings (``TUNING``), read at call time;
- :mod:`~segresmamba.ssm.triton.autograd`: the scan's ``autograd.Function`` and its entry points
  :func:`~segresmamba.ssm.triton.autograd.selective_scan_triton` and
  :func:`~segresmamba.ssm.triton.autograd.oriented_scan_triton`;
- :mod:`~segresmamba.ssm.triton.fused_tom`: the ToM branches' causal conv, projections and scans without
  permuted copies of the activations, as one autograd node;
- :mod:`~segresmamba.ssm.triton.token_norm`: the ToM layer's LayerNorm, read from the feature map in place and
  written as the tokens the input projection reads, one pass each way.

Importing this package imports no Triton: :mod:`segresmamba.ssm.scan` and the ToM layer load the modules
that need it on first use.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package imports (it is imported on the first call, not before)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_available(device: torch.device) -> bool:
    """The fused ToM path runs on CUDA with Triton (or, for tests, under ``TRITON_INTERPRET=1`` on a CPU)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return triton_available()


__all__ = ["fused_available", "triton_available"]
