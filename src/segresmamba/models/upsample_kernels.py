"""Triton kernels of :class:`segresmamba.models.upsample.TrilinearUpsample2x` (one launch each way).

Imports Triton: :mod:`segresmamba.models.upsample` loads this module on the first CUDA call (or, for tests,
under ``TRITON_INTERPRET=1`` on a CPU).

Trilinear interpolation by 2 with ``align_corners=False`` is separable, and along one axis of n inputs each output
takes two inputs with fixed weights (PyTorch's source index ``max(o / 2 - 1/4, 0)``, its upper neighbour clamped
to n - 1):

- output 2k:     1/4 x[max(k - 1, 0)] + 3/4 x[k]
- output 2k + 1: 3/4 x[k] + 1/4 x[min(k + 1, n - 1)]

so an output voxel is 8 inputs and the weights' products. The backward is the transpose, gathered instead of
scattered: input k receives outputs 2k - 1, 2k, 2k + 1, 2k + 2 with weights 1/4, 3/4, 3/4, 1/4, an index outside
[0, 2n - 1] clamped onto the edge (which is where the clamped forward sent that weight), so an input voxel reads
4^3 = 64 output gradients. Every program writes its own voxels: no atomics, and the result is deterministic
(PyTorch's CUDA backward adds with atomics).

Tensors go in as (N, C, D, H, W) with their own strides, so NCDHW and channels-last (NDHWC) maps are read in place;
a program walks a (voxel block x channel block) tile whose shape follows the layout (:func:`_blocks`): the threads
of a warp must step through neighbouring addresses, channels in NDHWC, voxels in NCDHW. All arithmetic in fp32;
each output is stored in its tensor's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from segresmamba.models.group_norm_kernels import is_channels_last
from segresmamba.ssm.triton.tuning import cdiv, next_power_of_2

# voxels x channels per program
TILE = 1024


@triton.jit
def _voxel(s, H, W):
    """Flat voxel indices ``s`` of a (D, H, W) grid, W fastest -> their (d, h, w)."""
    w = s % W
    h = (s // W) % H
    return s // (W * H), h, w


@triton.jit
def _fwd_taps(o, n):
    """Output index ``o`` of an axis with ``n`` inputs -> (lower input, upper input, lower weight)."""
    k = o // 2
    odd = (o % 2) == 1
    lo = tl.where(odd, k, tl.maximum(k - 1, 0))
    hi = tl.where(odd, tl.minimum(k + 1, n - 1), k)
    w_lo = tl.where(odd, 0.75, 0.25)
    return lo, hi, w_lo


@triton.jit
def _bwd_tap(k, t: tl.constexpr, n):
    """Input index ``k`` of an axis with ``n`` inputs -> its ``t``-th output (of 4), clamped, and that output's weight."""
    o = tl.minimum(tl.maximum(2 * k - 1 + t, 0), 2 * n - 1)
    w = 0.75 if (t == 1 or t == 2) else 0.25
    return o, w


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, C, D, H, W,
                sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    Ho = 2 * H
    Wo = 2 * W
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < 2 * D * Ho * Wo)[:, None] & (c < C)[None, :]
    od, oh, ow = _voxel(s, Ho, Wo)
    d0, d1, wd = _fwd_taps(od, D)
    h0, h1, wh = _fwd_taps(oh, H)
    w0, w1, ww = _fwd_taps(ow, W)
    x_base = x_ptr + n * sxn + (c * sxc)[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(2):
        di = d0 if i == 0 else d1
        fd = wd if i == 0 else 1.0 - wd
        for j in tl.static_range(2):
            hj = h0 if j == 0 else h1
            fh = wh if j == 0 else 1.0 - wh
            for m in tl.static_range(2):
                wm = w0 if m == 0 else w1
                fw = ww if m == 0 else 1.0 - ww
                offset = di * sxd + hj * sxh + wm * sxw
                v = tl.load(x_base + offset[:, None], mask=mask, other=0.0).to(tl.float32)
                acc += (fd * fh * fw)[:, None] * v
    y_offset = od * syd + oh * syh + ow * syw
    tl.store(y_ptr + n * syn + (c * syc)[None, :] + y_offset[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, dx_ptr, C, D, H, W,
                sgn, sgc, sgd, sgh, sgw, sxn, sxc, sxd, sxh, sxw,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < D * H * W)[:, None] & (c < C)[None, :]
    kd, kh, kw = _voxel(s, H, W)
    g_base = g_ptr + n * sgn + (c * sgc)[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(4):
        od, fd = _bwd_tap(kd, i, D)
        for j in tl.static_range(4):
            oh, fh = _bwd_tap(kh, j, H)
            row = od * sgd + oh * sgh
            part = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
            for m in tl.static_range(4):
                ow, fw = _bwd_tap(kw, m, W)
                v = tl.load(g_base + (row + ow * sgw)[:, None], mask=mask, other=0.0).to(tl.float32)
                part += fw * v
            acc += (fd * fh) * part
    x_offset = kd * sxd + kh * sxh + kw * sxw
    tl.store(dx_ptr + n * sxn + (c * sxc)[None, :] + x_offset[:, None], acc.to(dx_ptr.dtype.element_ty), mask=mask)


def _blocks(channels: int, channels_last: bool) -> tuple[int, int]:
    """(voxels, channels) of a program's tile of ``TILE`` elements. Consecutive threads take consecutive elements of
    the tile's last axis, so that axis must be the one whose neighbours lie together in memory: up to 64 channels of a
    channels-last map, voxels filling the rest; one channel of an NCDHW map, whose voxels along W are contiguous (a
    tile across its channels would put consecutive threads a whole map apart)."""
    if not channels_last:
        return TILE, 1
    bc = min(next_power_of_2(channels), 64)
    return max(TILE // bc, 16), bc


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.stride())


def upsample_forward(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(N, C, D, H, W) -> (N, C, 2D, 2H, 2W) in ``out_dtype``: channels-last for a channels-last ``x``, else NCDHW."""
    n, c, d, h, w = x.shape
    channels_last = is_channels_last(x)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    y = torch.empty((n, c, 2 * d, 2 * h, 2 * w), dtype=out_dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    bs, bc = _blocks(c, channels_last)
    grid = (cdiv(8 * d * h * w, bs), cdiv(c, bc), n)
    _fwd_kernel[grid](x, y, c, d, h, w, *_strides(x), *_strides(y), BLOCK_S=bs, BLOCK_C=bc)
    return y


def upsample_backward(grad: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`upsample_forward` for the output's gradient ``grad``, written into ``dx`` (shaped as the
    input, any strides) and returned."""
    n, c, d, h, w = dx.shape
    if dx.numel() == 0:
        return dx
    bs, bc = _blocks(c, is_channels_last(dx))
    grid = (cdiv(d * h * w, bs), cdiv(c, bc), n)
    _bwd_kernel[grid](grad, dx, c, d, h, w, *_strides(grad), *_strides(dx), BLOCK_S=bs, BLOCK_C=bc)
    return dx


__all__ = ["is_channels_last", "upsample_backward", "upsample_forward"]
