"""The token orders of the tri-oriented Mamba layer: forward, reverse and inter-slice.

Xing et al., "SegMamba: Long-range Sequential Modeling Mamba For 3D Medical Image Segmentation", MICCAI 2024:
a 3D feature map (D, H, W) is flattened row-major into L tokens and scanned in three orders,

- ``"forward"``: the row-major order itself;
- ``"reverse"``: the same order backwards;
- ``"slice"``: inter-slice, the tokens cut into ``nslices`` equal slices and visited one position of every
  slice at a time (with ``nslices == D``: all depths of one (h, w) position before the next, depth first).

This module is the one place that names them. An orientation's *code*, the integer the Triton kernels branch
on, is its index in :data:`ORIENTATIONS`. It imports torch only, so every other part of :mod:`segresmamba.ssm`
can import it.
"""

from __future__ import annotations

import torch

ORIENTATIONS: tuple[str, ...] = ("forward", "reverse", "slice")


def orientation_codes(orientations: tuple[str, ...]) -> tuple[int, ...]:
    """The codes (indices in :data:`ORIENTATIONS`) of ``orientations``, for the Triton kernels."""
    unknown = [o for o in orientations if o not in ORIENTATIONS]
    if unknown:
        raise ValueError(f"unknown orientations {unknown}; choose from {ORIENTATIONS}")
    return tuple(ORIENTATIONS.index(o) for o in orientations)


def slice_interleave(x: torch.Tensor, nslices: int) -> torch.Tensor:
    """Inter-slice order along the last axis: ``[chunk0[p], chunk1[p], ..., chunk_{n-1}[p]]`` for each p.

    With the sequence flattened row-major from (D, H, W) and ``nslices == D``, this visits all depths
    of one (h, w) position before moving on: a depth-first scan.
    """
    *lead, length = x.shape
    if length % nslices:
        raise ValueError(f"sequence length {length} is not divisible by nslices={nslices}")
    return x.reshape(*lead, nslices, length // nslices).transpose(-1, -2).reshape(*lead, length)


def slice_deinterleave(x: torch.Tensor, nslices: int) -> torch.Tensor:
    """Inverse of :func:`slice_interleave`."""
    *lead, length = x.shape
    return x.reshape(*lead, length // nslices, nslices).transpose(-1, -2).reshape(*lead, length)


def orient(x: torch.Tensor, orientation: str, nslices: int) -> torch.Tensor:
    """Reorder the last (token) axis into a branch's scan order."""
    if orientation == "forward":
        return x
    if orientation == "reverse":
        return x.flip(-1)
    if orientation == "slice":
        return slice_interleave(x, nslices)
    raise ValueError(f"unknown orientation {orientation!r}; choose from {ORIENTATIONS}")


def unorient(x: torch.Tensor, orientation: str, nslices: int) -> torch.Tensor:
    """Inverse of :func:`orient`: back to the row-major (D, H, W) token order."""
    if orientation == "slice":
        return slice_deinterleave(x, nslices)
    return orient(x, orientation, nslices)


__all__ = ["ORIENTATIONS", "orient", "orientation_codes", "slice_deinterleave", "slice_interleave", "unorient"]
