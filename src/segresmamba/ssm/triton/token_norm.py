"""The ToM layer's LayerNorm over channels, read from the (B, C, D, H, W) map and written as (B, L, C) tokens.

:class:`segresmamba.ssm.tom.TriOrientedMamba` normalises each token over its C channels (``nn.LayerNorm(C)``)
before the input projection. Done with PyTorch ops on a contiguous (B, C, D, H, W) map, under CUDA autocast,
that is four passes over the activations and four launches: the transposed copy LayerNorm needs (its input must
be contiguous along C), autocast's cast of that copy to fp32 (``layer_norm`` is on the fp32 list), the norm, and
the input projection's cast of its fp32 output back to the 16-bit autocast dtype. The backward mirrors them.
:class:`TokenLayerNormFn` is one pass each way: it reads the map in place (a tile of C channels by a run of
tokens, contiguous along the tokens), computes in fp32, and writes the tokens in the dtype the projection reads
(``out_dtype``: the autocast dtype under autocast, else the input's). The values are those of the four ops
(LayerNorm in fp32 of the exactly cast input, then one rounding), up to the order of the sums over C. A
channels-last map (``--model.channels_last``: the map's memory is already (B, L, C)) goes through the same kernels
with the map addressed as the tokens are; without them PyTorch's LayerNorm adds the fp32 output and the cast back.

Forward: ``mean = sum_c x / C``, ``var = sum_c (x - mean)^2 / C`` (biased, from the centred values), ``rstd =
1 / sqrt(var + eps)``, ``y = (x - mean) rstd w + b``. Backward with ``xhat = (x - mean) rstd`` and ``g = w dy``:
``dx = rstd (g - mean_c(g) - xhat mean_c(g xhat))``, ``dw = sum_tokens dy xhat``, ``db = sum_tokens dy`` (partial sums
per program, added up by one reduction).

Imports Triton: the ToM layer loads this module with its other fused kernels, where
:func:`segresmamba.ssm.triton.fused_available` says they run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from segresmamba.ssm.triton.tuning import autocast_dtype_or, cdiv, next_power_of_2

TILE = 8192  # elements of the (channels x tokens) tile one program holds


@triton.jit
def _tile_offsets(C, L, BC: tl.constexpr, BT: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """This program's channels c and tokens t, their masks, the offset of its tile in the (B, C, L) map (its memory
    (B, L, C) when CHANNELS_LAST) and in the (B, L, C) tokens, and its tokens' rows of the (B, L) statistics."""
    pt, b = tl.program_id(0), tl.program_id(1)
    c = tl.arange(0, BC)
    t = pt * BT + tl.arange(0, BT)
    mask_c, mask_t = c < C, t < L
    base = b.to(tl.int64) * C * L  # the same offset per batch element in both layouts
    at_tokens = base + t[None, :] * C + c[:, None]
    at_map = at_tokens if CHANNELS_LAST else base + c[:, None] * L + t[None, :]
    return c, t, mask_c, mask_t, mask_c[:, None] & mask_t[None, :], at_map, at_tokens, b.to(tl.int64) * L + t


@triton.jit
def _token_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, C, L, eps,
                           BC: tl.constexpr, BT: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    c, t, mask_c, mask_t, mask, at_map, at_tokens, row = _tile_offsets(C, L, BC, BT, CHANNELS_LAST)
    x = tl.load(x_ptr + at_map, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
    w = tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    y = centred * rstd[None, :] * w[:, None] + bias[:, None]
    tl.store(y_ptr + at_tokens, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=mask_t)
    tl.store(rstd_ptr + row, rstd, mask=mask_t)


@triton.jit
def _token_norm_bwd_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr, C, L,
                           BC: tl.constexpr, BT: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    c, t, mask_c, mask_t, mask, at_map, at_tokens, row = _tile_offsets(C, L, BC, BT, CHANNELS_LAST)
    x = tl.load(x_ptr + at_map, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + at_tokens, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row, mask=mask_t, other=0.0)
    rstd = tl.load(rstd_ptr + row, mask=mask_t, other=0.0)
    w = tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    g = dy * w[:, None]
    mean_g = tl.sum(g, axis=0) / C
    mean_gx = tl.sum(g * xhat, axis=0) / C
    dx = (g - mean_g[None, :] - xhat * mean_gx[None, :]) * rstd[None, :]
    tl.store(dx_ptr + at_map, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * C + c
    tl.store(dw_part_ptr + part, tl.sum(dy * xhat, axis=1), mask=mask_c)
    tl.store(db_part_ptr + part, tl.sum(dy, axis=1), mask=mask_c)


def _launch_tile(channels: int) -> tuple[int, int, int]:
    """Channel block (the channels rounded up to a power of two), tokens per program (16 to 128) and warps."""
    block_c = next_power_of_2(channels)
    block_t = max(16, min(128, TILE // block_c))
    return block_c, block_t, 4 if block_c * block_t <= 4096 else 8


def _channels_last(x: torch.Tensor) -> bool:
    """Whether a dense (B, C, L) map lies in memory as (B, L, C) (a channels-last map's flattened view), not as
    itself."""
    return x.shape[1] > 1 and x.stride(1) == 1 and x.stride(2) == x.shape[1]


class TokenLayerNormFn(torch.autograd.Function):
    """``LayerNorm(C)`` of every token of a (B, C, L) map, contiguous or lying as (B, L, C) in memory, as (B, L, C)
    tokens in ``out_dtype``.

    ``apply(x, weight, bias, eps, out_dtype)``; weight and bias (C,). The gradient of x comes back in x's dtype
    and layout, those of weight and bias in theirs. Autocast does not see a custom Function: nothing is cast on
    the way in."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        b, c, length = x.shape
        block_c, block_t, warps = _launch_tile(c)
        y = torch.empty(b, length, c, dtype=out_dtype, device=x.device)
        mean = torch.empty(b, length, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _token_norm_fwd_kernel[(cdiv(length, block_t), b)](x, weight, bias, y, mean, rstd, c, length, eps,
                                                           BC=block_c, BT=block_t, CHANNELS_LAST=_channels_last(x),
                                                           num_warps=warps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        b, c, length = x.shape
        block_c, block_t, warps = _launch_tile(c)
        programs = cdiv(length, block_t)
        dy = dy.contiguous()
        dx = torch.empty_like(x)  # x's strides
        parts = torch.empty(2, b * programs, c, dtype=torch.float32, device=x.device)  # dw, then db: one reduction
        _token_norm_bwd_kernel[(programs, b)](x, dy, weight, mean, rstd, dx, parts[0], parts[1], c, length,
                                              BC=block_c, BT=block_t, CHANNELS_LAST=_channels_last(x), num_warps=warps)
        dw, db = parts.sum(1).unbind(0)
        return dx, dw.to(ctx.dtypes[0]), db.to(ctx.dtypes[1]), None, None


def token_layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """``norm(x.flatten(2).transpose(1, 2))`` for a contiguous or channels-last (B, C, *spatial) ``x`` with ``norm`` an affine
    ``nn.LayerNorm(C)`` with bias, as the tokens the input projection reads: in the autocast dtype of x's device
    where autocast is on (what that projection would cast the fp32 LayerNorm output to), else in x's dtype."""
    return TokenLayerNormFn.apply(x.flatten(2), norm.weight, norm.bias, norm.eps, autocast_dtype_or(x.device.type, x.dtype))


def token_layer_norm_applies(x: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """Whether :func:`token_layer_norm` computes ``norm`` of x's tokens: a contiguous or channels-last 5-D map of
    16/32-bit floats and an affine LayerNorm over its channels, with bias."""
    dense = x.dim() == 5 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d))
    return (dense and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and tuple(norm.normalized_shape) == (x.shape[1],) and norm.weight is not None and norm.bias is not None)


__all__ = ["TokenLayerNormFn", "token_layer_norm", "token_layer_norm_applies"]
