"""The Triton selective scan as PyTorch functions: launches, autograd, and the entry points.

:func:`selective_scan_triton` is the ``scan_backend="triton"`` of :mod:`segresmamba.ssm.scan` (Mamba-1
semantics, arguments as :func:`segresmamba.ssm.scan_torch.selective_scan_torch`); :func:`oriented_scan_triton`
runs the scans of several ToM branches, each in its own token order, in one launch per pass. Both go through
:class:`SelectiveScanTritonFn`, whose passes are :func:`scan_forward` and :func:`scan_backward`: they launch the
kernels of :mod:`segresmamba.ssm.triton.kernels` with the settings of :mod:`segresmamba.ssm.triton.tuning`,
read at call time. The fused ToM layer (:mod:`segresmamba.ssm.triton.fused_tom`) calls the two passes inside its
own autograd node. The algorithm, and its plain-PyTorch oracle, is :mod:`segresmamba.ssm.triton.reference`.

Imports Triton: :mod:`segresmamba.ssm.scan` loads this module on the first use of the Triton backend.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton

from segresmamba.ssm.orientations import ORIENTATIONS, orient, orientation_codes, unorient
from segresmamba.ssm.scan_torch import _check_inputs
from segresmamba.ssm.triton.kernels import (
    _bwd_chunk_state_kernel,
    _bwd_grad_kernel,
    _carry_kernel,
    _fwd_chunk_state_kernel,
    _fwd_output_kernel,
)
from segresmamba.ssm.triton.tuning import CARRY_LANES, CARRY_ROWS, TUNING, cdiv, kernel_inputs, mirrored_backward, next_power_of_2


MAX_CHUNKS = 65535  # the scan kernels put the chunks on grid axis 1, which CUDA stops at 65535


def launch_plan(b: int, d: int, n: int, length: int, chunk: int):
    """Chunk length T (power of two), state block, channels per program, warps.

    A sequence of more than ``MAX_CHUNKS`` chunks (over 4.2 M tokens at 64-token chunks) gets longer chunks, enough
    to fit the grid: slower than the tuned length, but a valid launch."""
    return _launch_plan(b, d, n, length, chunk, TUNING["max_group"], TUNING["warps"], MAX_CHUNKS)


@functools.lru_cache(maxsize=256)
def _launch_plan(b: int, d: int, n: int, length: int, chunk: int, max_group: int, warps: int | None, max_chunks: int):
    # cached: the plan is a pure function of its arguments, and a layer asks for the same one every step
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    T = max(16, min(chunk, next_power_of_2(length)))
    T = max(T, next_power_of_2(cdiv(length, max_chunks)))
    nchunks = cdiv(length, T)
    BN = max(2, next_power_of_2(n))
    # channels per program: a divisor of d (no ragged group), as large as keeps the grid several waves deep
    divisors = [g for g in range(min(max_group, d), 0, -1) if d % g == 0]
    group = next((g for g in divisors if b * nchunks * (d // g) >= 2048), 1)
    warps = warps or (4 if BN * T <= 2048 else 8)
    return T, nchunks, BN, group, warps


def branch_rows(t: torch.Tensor) -> torch.Tensor:
    """(R, b, c, L) -> (R b, c, L), the kernels' rows ``r * b + i``: a view when the first two dims are contiguous."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def last_dim_unit(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with unit stride along its last (token) axis, copied only where it has none."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


SPLIT_SUM_ROWS = 1024  # partial rows from which sum_partials reduces in two steps


def sum_partials(parts: torch.Tensor, dim: int) -> torch.Tensor:
    """``parts.sum(dim)`` as two reductions over about sqrt(K) rows each (K = ``parts.shape[dim]``), the same sum
    up to its order. One reduction over a long axis with few outputs makes torch split each output across thread
    blocks, through a global buffer of its own: 133 MiB measured for the dA partials of a ToM layer's scans on
    64^3 tokens (H200), at the top of SegResMamba's memory during its backward."""
    k = parts.shape[dim]
    if k < SPLIT_SUM_ROWS:  # short enough for one pass; the second reduction would only cost the host
        return parts.sum(dim)
    rows = next(f for f in range(int(k**0.5), 0, -1) if k % f == 0)
    return parts.unflatten(dim, (k // rows, rows)).sum(dim + 1).sum(dim) if rows > 1 else parts.sum(dim)


def _run_carry(decay: torch.Tensor, local: torch.Tensor, reverse: bool) -> torch.Tensor:
    b, nchunks, d, n = decay.shape
    out = torch.empty(b, nchunks + 1, d, n, dtype=torch.float32, device=decay.device)
    lanes = d * n
    _carry_kernel[(cdiv(lanes, CARRY_LANES), b)](
        decay, local, out, nchunks, cdiv(nchunks, CARRY_ROWS), lanes, ROWS=CARRY_ROWS, BLOCK=CARRY_LANES, REVERSE=reverse, num_warps=4
    )
    return out


_order_indices: dict[tuple, torch.Tensor] = {}


def _scan_order_index(device: torch.device, codes: tuple[int, ...], nb: int, length: int, nslices: int, inverse: bool) -> torch.Tensor:
    """(R nb, 1, L) int64: for row ``r * nb + i``, the natural token read at each scan position of branch r's
    order (``inverse``: the scan position read at each natural token). Built from :func:`orient` itself, so it
    cannot drift from the per-branch path, and cached per (device, orders, length).

    Inside a CUDA-graph capture the index is built but not cached: its kernels run only when the graph replays, so
    a cached copy would hold garbage for an eager call made before the first replay."""
    key = (device, codes, nb, length, nslices, inverse)
    if key in _order_indices:
        return _order_indices[key]
    tokens = torch.arange(length, device=device).view(1, 1, length)
    reorder = unorient if inverse else orient
    index = torch.cat([reorder(tokens, ORIENTATIONS[code], nslices) for code in codes]).repeat_interleave(nb, dim=0)
    if not capturing(device):
        _order_indices[key] = index
    return index


def _states_in_scan_order(t: torch.Tensor, codes: tuple[int, ...], nb: int, nslices: int, inverse: bool = False) -> torch.Tensor:
    """B, C (or their gradients; any leading dims before the rows) of rows ``r * nb + i`` reordered along L into
    branch r's scan order (``inverse``: back to the natural order), in one gather. These (n x L) tensors are small
    next to the (d x L) activations, and contiguous in scan order they load as token-contiguous tiles, which keeps
    every scan inside one warp; the activations themselves stay in place and are addressed by index arithmetic."""
    if not any(codes):
        return t
    index = _scan_order_index(t.device, codes, nb, t.shape[-1], nslices, inverse)
    return torch.gather(t, -1, index.expand(t.shape))


_code_tensors: dict[tuple, torch.Tensor] = {}


def capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being recorded into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def codes_on(device: torch.device, codes: tuple[int, ...]) -> torch.Tensor:
    """The orientation codes as an int32 tensor on ``device``, as the kernels read them (cached).

    Inside a CUDA-graph capture a set not seen before (one branch's code, where a capture runs the branches one at a
    time) is filled on the device by the graph itself and not cached: a host-to-device copy cannot be captured, and a
    tensor made in a capture holds its values only once the graph replays."""
    key = (device, codes)
    if key in _code_tensors:
        return _code_tensors[key]
    if capturing(device):
        fresh = torch.empty(len(codes), dtype=torch.int32, device=device)
        for i, code in enumerate(codes):
            fresh[i].fill_(code)
        return fresh
    _code_tensors[key] = torch.tensor(codes, dtype=torch.int32, device=device)  # one small copy per (device, set)
    return _code_tensors[key]


class ScanSaved(NamedTuple):
    """What the scan's backward needs from its forward: ``tensors`` (u, delta, A, B, C, D, z, delta_bias, entering;
    None where absent), the launch ``plan``, the ``layout`` (codes, nb, nslices) and the softplus flag."""

    tensors: tuple
    plan: tuple
    layout: tuple
    delta_softplus: bool


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, codes, nb, nslices, chunk):
    """The forward passes of :class:`SelectiveScanTritonFn` (arguments as its ``forward``), without autograd.

    Returns y (R nb, d, L) in u's dtype, and ``saved``, what :func:`scan_backward` needs: the inputs as given
    (16-bit where they are; the backward makes its own kernel copies) and the chunk-entering states."""
    u_in, delta_in, B_in, C_in, z = (last_dim_unit(t) for t in (u, delta, B, C, z))
    D, delta_bias = last_dim_unit(D), last_dim_unit(delta_bias)  # (R, d): the kernels index channels directly
    u, delta, B, C, _ = kernel_inputs(u_in, delta_in, B_in, C_in)
    rows, d, length = u.shape
    B, C = (_states_in_scan_order(t, codes, nb, nslices) for t in (B, C))
    n = A.shape[-1]
    seg = length // nslices
    code_t = codes_on(u.device, codes)
    T, nchunks, BN, group, warps = launch_plan(rows, d, n, length, chunk)
    grid = (d // group, nchunks, rows)
    f32 = dict(dtype=torch.float32, device=u.device)
    local_end = torch.empty(rows, nchunks, d, n, **f32)
    decay = torch.empty(rows, nchunks, d, n, **f32)
    bias = delta_bias if delta_bias is not None else u
    sbias = delta_bias.stride(0) if delta_bias is not None else 0
    _fwd_chunk_state_kernel[grid](
        u, delta, A, B, bias, local_end, decay, code_t,
        d, length, n, nchunks, nb, nslices, seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), A.stride(0), A.stride(1), A.stride(2),
        B.stride(0), B.stride(1), sbias,
        GROUP=group, T=T, BN=BN, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, num_warps=warps,
    )
    entering = _run_carry(decay, local_end, reverse=False)
    del local_end, decay
    y = torch.empty(rows, d, length, dtype=u_in.dtype, device=u.device)
    zz = z if z is not None else u
    DD = D if D is not None else u
    _fwd_output_kernel[grid](
        u, delta, A, B, C, DD, zz, bias, entering, y, code_t,
        d, length, n, nchunks, nb, nslices, seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
        y.stride(0), y.stride(1), A.stride(0), A.stride(1), A.stride(2), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        D.stride(0) if D is not None else 0, sbias,
        GROUP=group, T=T, BN=BN, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, num_warps=warps,
    )
    return y, ScanSaved((u_in, delta_in, A, B_in, C_in, D, z, delta_bias, entering), (T, nchunks, BN, group, warps),
                        (codes, nb, nslices), delta_softplus)


def scan_backward(saved: ScanSaved, grad_y: torch.Tensor) -> tuple:
    """The backward passes of :class:`SelectiveScanTritonFn` for ``grad_y`` (R nb, d, L; any row stride, a
    stride-0 broadcast included), without autograd.

    Returns du, ddelta, dA, dB, dC, dD, dz, ddelta_bias in their inputs' dtypes (None for absent inputs); dz is
    summed over the branches, (nb, d, L), as z is shared."""
    u_in, delta_in, A, B_in, C_in, D, z, delta_bias, entering = saved.tensors
    T, nchunks, BN, group, warps = saved.plan
    codes, nb, nslices = saved.layout
    branches = len(codes)
    u, delta, B, C, grad_y = kernel_inputs(u_in, delta_in, B_in, C_in, last_dim_unit(grad_y))
    rows, d, length = u.shape
    B, C = (_states_in_scan_order(t, codes, nb, nslices) for t in (B, C))
    n = A.shape[-1]
    seg = length // nslices
    code_t = codes_on(u.device, codes)
    grid = (d // group, nchunks, rows)
    f32 = dict(dtype=torch.float32, device=u.device)
    has_bias, has_z, has_d = delta_bias is not None, z is not None, D is not None
    bias = delta_bias if has_bias else u
    sbias = delta_bias.stride(0) if has_bias else 0
    zz = z if has_z else u

    first = torch.empty(rows, nchunks, d, n, **f32)
    decay = torch.empty(rows, nchunks, d, n, **f32)
    _bwd_chunk_state_kernel[grid](
        delta, A, C, zz, bias, grad_y, first, decay, code_t,
        d, length, n, nchunks, nb, nslices, seg,
        delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1), grad_y.stride(0), grad_y.stride(1),
        A.stride(0), A.stride(1), A.stride(2), C.stride(0), C.stride(1), sbias,
        GROUP=group, T=T, BN=BN, HAS_Z=has_z, HAS_BIAS=has_bias, SOFTPLUS=saved.delta_softplus, num_warps=warps,
    )
    into_end = _run_carry(decay, first, reverse=True)
    del first, decay

    du = torch.empty(rows, d, length, dtype=u_in.dtype, device=u.device)
    ddelta = torch.empty(rows, d, length, dtype=delta_in.dtype, device=u.device)
    # one dz row per (branch, batch element); the branches' shares are summed below
    dz = torch.empty(rows, d, length, dtype=z.dtype, device=u.device) if has_z else du
    dBC = torch.zeros(2, rows, n, length, **f32)  # dB and dC: one fill, one reorder and one cast for both
    dB, dC = dBC.unbind(0)
    dA_part = torch.empty(rows * nchunks, d, n, **f32)
    # the D and delta_bias partials side by side: one reduction for both
    d_bias_parts = torch.empty(2, rows * nchunks, d, **f32)
    dD_part, dbias_part = d_bias_parts.unbind(0)
    _bwd_grad_kernel[grid](
        u, delta, A, B, C, D if has_d else u, zz, bias, grad_y, entering, into_end,
        du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part, code_t,
        d, length, n, nchunks, nb, nslices, seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
        grad_y.stride(0), grad_y.stride(1), du.stride(0), du.stride(1),
        A.stride(0), A.stride(1), A.stride(2), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        D.stride(0) if has_d else 0, sbias,
        GROUP=group, T=T, BN=BN, HAS_D=has_d, HAS_Z=has_z, HAS_BIAS=has_bias, SOFTPLUS=saved.delta_softplus,
        MIRROR=mirrored_backward(triton.__version__), num_warps=TUNING["bwd_warps"] or warps,
        **({"maxnreg": TUNING["bwd_maxnreg"]} if TUNING["bwd_maxnreg"] else {}),
    )
    del into_end, B, C, grad_y  # the caller's peak comes after: these would live through the casts and reorders below

    # partial rows (rows * nchunks) summed per branch
    dA = sum_partials(dA_part.view(branches, -1, d, n), 1).to(A.dtype)
    dD, dbias = sum_partials(d_bias_parts.view(2, branches, -1, d), 2).unbind(0)
    if has_z:
        dz = dz if branches == 1 else dz.view(branches, nb, d, length).sum(0)  # fp32 accumulation, z's dtype
    if B_in.dtype == C_in.dtype:
        # cast, then reorder: the same values (a reorder moves them, a cast acts on each), and the reorder's
        # output is 16-bit where the inputs are
        dBC = dBC.to(B_in.dtype)
    dB, dC = _states_in_scan_order(dBC, codes, nb, nslices, inverse=True).unbind(0)
    return (
        du, ddelta, dA, dB.to(B_in.dtype), dC.to(C_in.dtype), dD.to(D.dtype) if has_d else None, dz if has_z else None,
        dbias.to(delta_bias.dtype) if has_bias else None,
    )


class SelectiveScanTritonFn(torch.autograd.Function):
    """Chunk-parallel selective scan of R branches x nb batch elements in one launch per pass.

    Rows ``r * nb + i`` of u, delta (R nb, d, L) and B, C (R nb, n, L) belong to branch r, whose
    parameters are ``A[r]`` (d, n), ``D[r]``, ``delta_bias[r]`` (d) and whose scan order has the code
    ``codes[r]`` (:func:`segresmamba.ssm.orientations.orientation_codes`; inter-slice over ``nslices``
    slices). The (d x L) tensors stay in their natural token order, read and written by index arithmetic,
    and y comes back in it; only B and C (n x L, with n = d_state much smaller than d) are copied into each
    branch's scan order for the kernels.
    z (nb, d, L) is shared by the branches. Saves the inputs and the chunk-entering states only.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, codes, nb, nslices, chunk):
        y, saved = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, codes, nb, nslices, chunk)
        ctx.save_for_backward(*saved.tensors)
        ctx.saved = saved._replace(tensors=None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        grads = scan_backward(ctx.saved._replace(tensors=ctx.saved_tensors), grad_y)
        return (*grads, None, None, None, None, None)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Selective scan on CUDA through Triton; arguments and result as :func:`selective_scan_torch`.

    Args:
        chunk: tokens per chunk, a power of two >= 16 (shorter sequences use one shorter chunk);
            ``None`` reads ``TUNING["chunk"]`` at call time.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    chunk = TUNING["chunk"] if chunk is None else chunk
    return SelectiveScanTritonFn.apply(
        u, delta, A[None], B, C, None if D is None else D[None], z, None if delta_bias is None else delta_bias[None],
        bool(delta_softplus), (0,), u.shape[0], 1, chunk,
    )


def oriented_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    orientations: tuple[str, ...],
    nslices: int,
    delta_softplus: bool = True,
    chunk: int | None = None,
) -> torch.Tensor:
    """The scans of several ToM branches in one launch per pass, each in its own token order.

    Every tensor is in the natural (row-major D, H, W) token order; branch r scans it in the order
    ``orientations[r]`` ("forward", "reverse" or "slice": the inter-slice order of
    :func:`segresmamba.ssm.orientations.slice_interleave` with ``nslices``) by index arithmetic, without permuted
    copies of u, delta or z (B and C, n x L, are copied into scan order), and its output comes back in the
    natural order: for each branch the result equals
    ``unorient(selective_scan(orient(u_r), ...), o_r)``.

    Args:
        u, delta: (R, b, d, L). B, C: (R, b, n, L). A: (R, d, n). D, delta_bias: (R, d) or None.
        z: (b, d, L), the gate shared by the branches (ToM's shared in_proj output), or None.
        orientations: R names. nslices: slices of the inter-slice order (L must be divisible by it).
        chunk: tokens per chunk (see :func:`selective_scan_triton`).

    Returns:
        y: (R, b, d, L).
    """
    branches, b, d, length = u.shape
    if len(orientations) != branches:
        raise ValueError(f"orientations must name the {branches} branches with {ORIENTATIONS}, got {orientations}")
    codes = orientation_codes(orientations)
    if nslices < 1 or length % nslices:
        raise ValueError(f"sequence length {length} is not divisible by nslices={nslices}")
    n = A.shape[-1]
    shapes = {"delta": (delta, (branches, b, d, length)), "B": (B, (branches, b, n, length)), "C": (C, (branches, b, n, length)),
              "A": (A, (branches, d, n))}
    shapes.update({k: (v, (branches, d)) for k, v in (("D", D), ("delta_bias", delta_bias)) if v is not None})
    if z is not None:
        shapes["z"] = (z, (b, d, length))
    for name, (t, want) in shapes.items():
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")

    chunk = TUNING["chunk"] if chunk is None else chunk
    y = SelectiveScanTritonFn.apply(
        branch_rows(u), branch_rows(delta), A, branch_rows(B), branch_rows(C), D, z, delta_bias, bool(delta_softplus), codes, b,
        nslices, chunk,
    )
    return y.view(branches, b, d, length)


__all__ = ["MAX_CHUNKS", "ScanSaved", "SelectiveScanTritonFn", "branch_rows", "capturing", "launch_plan", "oriented_scan_triton",
           "scan_backward", "scan_forward", "selective_scan_triton", "sum_partials"]
