"""The ToM layer's branch work on the GPU without permuted copies of its (channels x tokens) activations.

:class:`segresmamba.ssm.tom.TriOrientedMamba` computes, per orientation o (forward, reverse, inter-slice),
``unorient(scan(silu(conv_o(orient(x)))), o)``. Here the activations stay in the natural (D, H, W) token
order and the orientations are index arithmetic inside the kernels (only the scan's small B and C, d_state
channels, are copied into each branch's order: see :func:`segresmamba.ssm.triton.autograd.oriented_scan_triton`):

- :func:`oriented_conv_silu`: the causal depthwise conv of every branch along its own scan order, with
  the SiLU fused, reading the in_proj output in place (any strides) and writing ``(R, b, d, L)``;
- the x / dt projections are per token, so they run on the natural order as batched matmuls;
- :func:`segresmamba.ssm.triton.autograd.oriented_scan_triton`: all branches' scans in one launch per pass.

Causal conv in scan order, for a branch whose order visits token ``idx(p)`` at position p, with weights
w (d, K) and bias c::

    pre[p] = c + sum_k w[k] x[idx(p - K + 1 + k)]   (terms with p - K + 1 + k < 0 left out)
    u[idx(p)] = silu(pre[p])

Backward (g = grad of u): ``gp[p] = g[idx(p)] silu'(pre[p])``, ``dx[idx(q)] = sum_k w[k] gp[q + K - 1 - k]``,
``dw[k] = sum_p gp[p] x[idx(p - K + 1 + k)]``, ``dc = sum_p gp[p]``; dx of the branches is summed (they share x)
in the dx kernel's registers.
The kernels tile natural token indices and store gp in natural order too, so that the inter-slice branch reads
and writes whole runs of tokens rather than one token per M-strided cache sector.

Imports Triton: :class:`~segresmamba.ssm.tom.TriOrientedMamba` loads this module on the first fused call
(where :func:`segresmamba.ssm.triton.fused_available` says the path runs).
"""

from __future__ import annotations

import torch
import triton

from segresmamba.ssm.orientations import orientation_codes
from segresmamba.ssm.triton.autograd import codes_on, last_dim_unit, oriented_scan_triton
from segresmamba.ssm.triton.kernels import _conv_bwd_dx_kernel, _conv_bwd_pre_kernel, _conv_fwd_kernel

BLOCK_T, BLOCK_D = 128, 16


class OrientedConvSiluFn(torch.autograd.Function):
    """``u[r] = silu(causal depthwise conv of x along branch r's scan order)``, natural token order."""

    @staticmethod
    def forward(ctx, x, weight, bias, codes, nslices):
        b, d, length = x.shape
        branches, _, k = weight.shape
        weight, bias = weight.contiguous(), bias.contiguous()
        code_t = codes_on(x.device, codes)
        u = torch.empty(branches * b, d, length, dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(length, BLOCK_T), triton.cdiv(d, BLOCK_D), branches * b)
        _conv_fwd_kernel[grid](
            x, weight, bias, u, code_t, length, d, b, nslices, length // nslices,
            x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), bias.stride(0), u.stride(0), u.stride(1),
            K=k, BT=BLOCK_T, BD=BLOCK_D,
        )
        ctx.save_for_backward(x, weight, bias)
        ctx.layout = (codes, nslices)
        return u.view(branches, b, d, length)

    @staticmethod
    def backward(ctx, grad_u):
        x, weight, bias = ctx.saved_tensors
        codes, nslices = ctx.layout
        b, d, length = x.shape
        branches, _, k = weight.shape
        grad_u = last_dim_unit(grad_u.reshape(branches * b, d, length))
        code_t = codes_on(x.device, codes)
        nt = triton.cdiv(length, BLOCK_T)
        grid = (nt, triton.cdiv(d, BLOCK_D), branches * b)
        f32 = dict(dtype=torch.float32, device=x.device)
        gp = torch.empty(branches * b, d, length, **f32)
        dw_part = torch.empty(branches * b * nt, d, k, **f32)
        db_part = torch.empty(branches * b * nt, d, **f32)
        _conv_bwd_pre_kernel[grid](
            x, weight, bias, grad_u, gp, dw_part, db_part, code_t, length, d, b, nslices, length // nslices, nt,
            x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), bias.stride(0), grad_u.stride(0), grad_u.stride(1),
            K=k, BT=BLOCK_T, BD=BLOCK_D,
        )
        # the branches' shares of dx are summed in the kernel's registers: one (b, d, L) tensor in x's dtype
        dx = torch.empty(b, d, length, dtype=x.dtype, device=x.device)
        _conv_bwd_dx_kernel[(nt, grid[1], b)](
            weight, gp, dx, code_t, length, d, b, branches, nslices, length // nslices, weight.stride(0), weight.stride(1),
            K=k, BT=BLOCK_T, BD=BLOCK_D,
        )
        dw = dw_part.view(branches, -1, d, k).sum(1).to(weight.dtype)
        db = db_part.view(branches, -1, d).sum(1).to(bias.dtype)
        return dx, dw, db, None, None


SPLIT_K_PIECE = 4096  # tokens per partial product of a weight gradient


def _weight_grad(g: torch.Tensor, x: torch.Tensor, piece: int | None = None) -> torch.Tensor:
    """``sum_{b, l} g[r, b, o, l] x[r, b, i, l]`` -> (R, O, I) in fp32, as partial products over pieces of
    the token axis summed afterwards. One GEMM with K = L (262,144 tokens at 64^3) and a 96 x 3 output
    (the delta projection) gets a handful of thread blocks from cuBLAS; pieces give it R b L / piece."""
    piece = piece or SPLIT_K_PIECE
    r, b, o, length = g.shape
    i = x.shape[2]
    full = length - length % piece
    out = None
    if full:
        k = full // piece
        gp = g[..., :full].reshape(r, b, o, k, piece).transpose(2, 3)  # (R, b, k, O, piece)
        xp = x[..., :full].reshape(r, b, i, k, piece).transpose(2, 3)  # (R, b, k, I, piece)
        out = torch.matmul(gp, xp.transpose(-1, -2)).sum((1, 2), dtype=torch.float32)
    if full < length:
        rest = torch.matmul(g[..., full:], x[..., full:].transpose(-1, -2)).sum(1, dtype=torch.float32)
        out = rest if out is None else out + rest
    return out


class TokensLastLinearFn(torch.autograd.Function):
    """``y[r, i] = weight[r] @ x[r, i]`` for weight (R, O, I) and x (R, b, I, L): a per-branch linear map
    with tokens last, in x's dtype (the weights are cast, as autocast would); the weight gradient is
    accumulated over token pieces (see :func:`_weight_grad`)."""

    @staticmethod
    def forward(ctx, weight, x):
        w = weight.to(x.dtype)
        ctx.save_for_backward(w, x)
        ctx.weight_dtype = weight.dtype
        return torch.matmul(w.unsqueeze(1), x)

    @staticmethod
    def backward(ctx, grad_y):
        w, x = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype)
        gw = _weight_grad(grad_y, x).to(ctx.weight_dtype) if ctx.needs_input_grad[0] else None
        gx = torch.matmul(w.transpose(1, 2).unsqueeze(1), grad_y) if ctx.needs_input_grad[1] else None
        return gw, gx


def tokens_last_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(R, O, I) weights applied to (R, b, I, L) tokens-last inputs -> (R, b, O, L), in x's dtype."""
    if weight.dim() != 3 or x.dim() != 4 or weight.shape[0] != x.shape[0] or weight.shape[2] != x.shape[2]:
        raise ValueError(f"weight (R, O, I) and x (R, b, I, L) do not match: {tuple(weight.shape)} and {tuple(x.shape)}")
    return TokensLastLinearFn.apply(weight, x)


def oriented_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, orientations: tuple[str, ...], nslices: int) -> torch.Tensor:
    """SiLU of each branch's causal depthwise conv along its scan order.

    Args:
        x: (b, d, L) in natural token order, any strides (e.g. a transposed slice of the in_proj output).
        weight: (R, d, K) conv taps of the R branches (``Conv1d.weight[:, 0, :]``); bias: (R, d).
        orientations: R names from :data:`~segresmamba.ssm.orientations.ORIENTATIONS`; nslices: slices of the inter-slice order.

    Returns:
        u: (R, b, d, L), natural token order.
    """
    if weight.dim() != 3 or weight.shape[:2] != (len(orientations), x.shape[1]) or tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f"weight must be (R, d, K) and bias (R, d) for R={len(orientations)}, d={x.shape[1]}; "
                         f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if x.shape[-1] % nslices:
        raise ValueError(f"sequence length {x.shape[-1]} is not divisible by nslices={nslices}")
    return OrientedConvSiluFn.apply(x, weight, bias, orientation_codes(orientations), nslices)


def stacked_branch_parameters(branches) -> dict[str, torch.Tensor]:
    """Each parameter of the ToM branches stacked along a new first axis (R, ...), from a single concatenation.

    One copy for all of them instead of one per kind: a host-bound eager step pays per launch, and a ToM layer
    has seven kinds. The stacks are views of that copy, whose backward hands every parameter a view of one
    gradient buffer. The conv taps are squeezed rather than indexed (``[:, 0, :]``): a select's backward fills and
    copies a new tensor, a squeeze's is a view."""
    kinds = {
        "conv_weight": [br.conv1d.weight.squeeze(1) for br in branches],  # (d, K)
        "conv_bias": [br.conv1d.bias for br in branches],
        "x_proj": [br.x_proj.weight for br in branches],  # (rank + 2N, d)
        "dt_weight": [br.dt_proj.weight for br in branches],  # (d, rank)
        "dt_bias": [br.dt_proj.bias for br in branches],
        "A_log": [br.A_log for br in branches],
        "D": [br.D for br in branches],
    }
    params = [p for group in kinds.values() for p in group]
    if len({p.dtype for p in params}) > 1:  # a model with mixed parameter dtypes: stack each kind on its own
        return {name: torch.stack(group) for name, group in kinds.items()}
    flat = torch.cat([p.reshape(-1) for p in params])
    stacked, offset = {}, 0
    for name, group in kinds.items():
        size = sum(p.numel() for p in group)
        stacked[name] = flat[offset:offset + size].view(len(group), *group[0].shape)
        offset += size
    return stacked


def tri_oriented_branches(xz: torch.Tensor, branches, orientations: tuple[str, ...], nslices: int) -> torch.Tensor:
    """Sum over the branches of their outputs, natural order: the fused equivalent of ToM's branch loop.

    Args:
        xz: (b, L, 2 d_inner), the shared in_proj output (x half, then z half).
        branches: the :class:`segresmamba.ssm.tom.SelectiveSSMBranch` modules, in ``orientations`` order.

    Returns:
        (b, d_inner, L).
    """
    d_inner = xz.shape[-1] // 2
    x = xz[..., :d_inner].transpose(1, 2)  # (b, d, L) views into xz: the kernels read them in place
    z = xz[..., d_inner:].transpose(1, 2)
    first = branches[0]
    p = stacked_branch_parameters(branches)
    u = oriented_conv_silu(x, p["conv_weight"], p["conv_bias"], orientations, nslices)  # (R, b, d, L)
    # projections with the weights on the left keep tokens last: dt, B, C and delta come out (R, b, ., L)
    # with unit token stride, as the scan reads them, so no transposed copy is made
    x_dbl = tokens_last_linear(p["x_proj"], u)  # (R, b, rank + 2N, L)
    dt, B, C = torch.split(x_dbl, [first.dt_rank, first.d_state, first.d_state], dim=2)
    delta = tokens_last_linear(p["dt_weight"], dt)  # (R, b, d, L)
    A = -torch.exp(p["A_log"].float())
    y = oriented_scan_triton(u, delta, A, B, C, p["D"].float(), z, p["dt_bias"].float(), orientations, nslices, delta_softplus=True)
    return y.sum(0)


__all__ = ["oriented_conv_silu", "stacked_branch_parameters", "tokens_last_linear", "tri_oriented_branches"]
