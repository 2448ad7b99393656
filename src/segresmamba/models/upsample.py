"""Trilinear upsampling by 2 (``align_corners=False``) in one Triton kernel each way (a drop-in for ``nn.Upsample``).

Why: the decoders of SegResMamba and SegResNet (Myronenko, "3D MRI brain tumor segmentation using autoencoder
regularization", BrainLes 2018) upsample by ``nn.Upsample(scale_factor=2, mode="trilinear")``. PyTorch's CUDA
kernels for it (``upsample_trilinear3d_out_frame`` and its backward) give one thread to each output voxel and loop
over the channels, and the backward adds into the input's gradient with atomics. In SegResMamba's BraTS training
step the three upsamplings took 0.68 ms forward and 0.37 ms backward (``results/perf/scan_notes.md``), for maps
whose bytes an H200 moves in a few microseconds. :mod:`segresmamba.models.upsample_kernels` computes the same
function with each program on a tile of voxels and channels, its backward gathering instead of scattering.

What is equal: the function (PyTorch's source index ``max((o + 1/2) / 2 - 1/2, 0)``, the upper neighbour clamped at
the edge), the memory format of the output (the input's: NCDHW or channels-last), and the dtype contract under
autocast: ``upsample_trilinear3d`` is on CUDA's autocast fp32 list, so a bf16 / fp16 input under CUDA autocast
gives an fp32 output (and its gradient comes back in the input's dtype); outside autocast the output keeps the
input's dtype. All arithmetic in fp32. What differs: the summation order (results equal PyTorch's within float
rounding) and determinism (the backward has no atomics).

Where it runs: on CUDA (or under Triton's interpreter) for 5-D fp32 / bf16 / fp16 input with Triton installed.
Elsewhere (a CPU without the interpreter, fp64, another scale or mode) and under ``torch.jit.trace`` (fvcore's
MAC count sees ``aten::upsample_trilinear3d``) ``nn.Upsample``'s own path runs.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["TrilinearUpsample2x", "TrilinearUpsample2xFunction", "use_fast_upsample"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_GRID_AXIS_LIMIT = 65535  # programs along a CUDA grid's y and z axes (channel blocks, samples)


@functools.cache
def _kernels():
    """:mod:`segresmamba.models.upsample_kernels`, or None where Triton does not import."""
    try:
        from segresmamba.models import upsample_kernels
    except ImportError:
        return None
    return upsample_kernels


def _use_kernels(x: torch.Tensor) -> bool:
    """The Triton path: a 5-D fp32 / bf16 / fp16 tensor on CUDA (or under Triton's interpreter), each sample's
    upsampled map under 2^31 elements (the kernels' 32-bit offsets), batch and channels within the launch grid's
    second and third axes (65,535), Triton present."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not on_device or x.dim() != 5 or x.dtype not in _KERNEL_DTYPES or torch.jit.is_tracing():
        return False
    fits = 8 * x[0].numel() < 2**31 and max(x.shape[0], x.shape[1]) <= _GRID_AXIS_LIMIT
    return fits and _kernels() is not None


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.interpolate(x, mode="trilinear")`` returns under the current autocast state (fp32 under CUDA
    autocast for bf16 / fp16 input; CPU autocast does not list the op)."""
    if x.dtype in _LOW_PRECISION and x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.float32
    return x.dtype


class TrilinearUpsample2xFunction(torch.autograd.Function):
    """``apply(x, out_dtype)``: x (N, C, D, H, W) -> (N, C, 2D, 2H, 2W) in ``out_dtype``, as
    ``F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)``; the gradient in ``x``'s dtype."""

    @staticmethod
    def forward(ctx, x, out_dtype):
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.x_channels_last = _kernels().is_channels_last(x)
        return _kernels().upsample_forward(x, out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        fmt = torch.channels_last_3d if ctx.x_channels_last else torch.contiguous_format
        dx = torch.empty(ctx.x_shape, dtype=ctx.x_dtype, device=grad_y.device, memory_format=fmt)
        return _kernels().upsample_backward(grad_y, dx), None


class TrilinearUpsample2x(nn.Upsample):
    """``nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)`` (same constructor) computed by
    :class:`TrilinearUpsample2xFunction` where the kernels run (see the module docstring), by ``nn.Upsample``
    elsewhere."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not _use_kernels(input):
            return super().forward(input)
        return TrilinearUpsample2xFunction.apply(input, _output_dtype(input))


def _is_trilinear_2x(mod: nn.Module) -> bool:
    if type(mod) is not nn.Upsample or mod.mode != "trilinear" or mod.size is not None or mod.align_corners:
        return False
    if mod.recompute_scale_factor:
        return False
    scale = mod.scale_factor
    scales = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * 3
    return len(scales) == 3 and all(float(s) == 2.0 for s in scales)


def use_fast_upsample(module: nn.Module) -> int:
    """Switch every ``nn.Upsample`` of ``module``'s tree that upsamples trilinearly by 2 with ``align_corners=False``
    to :class:`TrilinearUpsample2x` (in place: the module's class is swapped; it has no parameters or state).
    Returns how many were switched."""
    count = 0
    for mod in module.modules():
        if _is_trilinear_2x(mod):
            mod.__class__ = TrilinearUpsample2x
            count += 1
    return count

