"""Triton kernels of :class:`segresmamba.models.group_norm.GroupNormFunction` on CUDA (two passes each way).

Imports Triton: :mod:`segresmamba.models.group_norm` loads this module on the first CUDA call (or, for tests,
under ``TRITON_INTERPRET=1`` on a CPU). The input is an (N, C, S) view of a contiguous (N, C, *spatial)
tensor, so a group's C/G channels are one contiguous run of M = (C/G) S elements.

Forward, three launches:

- ``_stats_kernel``: grid (splits, N G); each program folds ``CHUNK`` elements of one group into a
  (count, mean, M2) triple, lane by lane with Welford's update and then across lanes with Chan et al.'s
  pairwise combination ("Algorithms for computing the sample variance", 1983): no sum of squares, so no
  cancellation when the mean is large against the spread;
- ``_finalize_kernel``: grid (N G,); combines a group's triples the same way: mean and rstd = 1/sqrt(var + eps);
- ``_apply_kernel``: grid (S blocks, N C); y = x scale + shift, scale = rstd[n, g] w[c],
  shift = b[c] - mean[n, g] scale, stored in the output dtype.

Backward, two full passes and one small launch between them (the algebra is
:class:`~segresmamba.models.group_norm.GroupNormFunction`'s):

- ``_grad_sums_kernel``: grid (splits, N C); per spatial chunk the partial sums of grad_y and grad_y x;
- ``_grad_coeff_kernel``: grid (N G,); dx's per-channel coefficients and the shares of dw and dbias;
- ``_grad_input_kernel``: grid (S blocks, N C); dx = p[n, c] grad_y + a[n, c] x + b2[n, c], in x's dtype.

A channels-last (N, *spatial, C in memory) tensor, as the suite's ``channels_last`` setting makes the 3D conv
activations, goes through ``_cl`` twins of the four full passes instead of a copy to NCDHW: each program walks a
(spatial block x channel block) tile whose channels are contiguous, and the reductions write per-(n, c) partials
laid out as the NCDHW ones (a group's channels one after another), so ``_finalize_kernel`` (with C/G times the
splits) and ``_grad_coeff_kernel`` serve both layouts.

All arithmetic in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from segresmamba.ssm.triton.tuning import cdiv, next_power_of_2

# elements per program of the reductions, and per program of the elementwise passes. The grids put these blocks
# on axis 0 (up to 2^31 - 1 programs); (N C) planes and (N G) rows go on axis 1 (at most 65535)
CHUNK = 8192
BLOCK = 1024
COEFF_BLOCK = 1024  # partial sums of one channel that _grad_coeff_kernel loads at a time


@triton.jit
def _chan_combine(n1, m1, v1, n2, m2, v2):
    # two (count, mean, M2) summaries -> their union's; an empty side (count 0) leaves the other as it is
    n = n1 + n2
    delta = m2 - m1
    frac = tl.where(n > 0, n2 / tl.maximum(n, 1.0), 0.0)
    return n, m1 + delta * frac, v1 + v2 + delta * delta * n1 * frac


@triton.jit
def _welford_step(cnt, mean, m2, x, mask):
    """Welford's update of per-lane (count, mean, M2) by one value per lane (masked lanes unchanged)."""
    cnt += mask.to(tl.float32)
    delta = tl.where(mask, x - mean, 0.0)
    mean += delta / tl.maximum(cnt, 1.0)
    m2 += delta * tl.where(mask, x - mean, 0.0)
    return cnt, mean, m2


@triton.jit
def _stats_kernel(x_ptr, part_ptr, M, SPLITS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    split, row = tl.program_id(0), tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * M
    lanes = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], dtype=tl.float32)
    mean = tl.zeros([BLOCK], dtype=tl.float32)
    m2 = tl.zeros([BLOCK], dtype=tl.float32)
    start = split * CHUNK
    for off in tl.static_range(0, CHUNK, BLOCK):
        idx = start + off + lanes
        mask = idx < M
        cnt, mean, m2 = _welford_step(cnt, mean, m2, tl.load(base + idx, mask=mask, other=0.0).to(tl.float32), mask)
    n, mu, v = tl.reduce((cnt, mean, m2), 0, _chan_combine)
    out = part_ptr + (row.to(tl.int64) * SPLITS + split) * 3
    tl.store(out, n)
    tl.store(out + 1, mu)
    tl.store(out + 2, v)


@triton.jit
def _finalize_kernel(part_ptr, mean_ptr, rstd_ptr, SPLITS, eps, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    cnt = tl.zeros([BLOCK_S], dtype=tl.float32)
    mean = tl.zeros([BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = s < SPLITS
        src = part_ptr + (row.to(tl.int64) * SPLITS + s) * 3
        n2 = tl.load(src, mask=mask, other=0.0)
        mu2 = tl.load(src + 1, mask=mask, other=0.0)
        v2 = tl.load(src + 2, mask=mask, other=0.0)
        cnt, mean, m2 = _chan_combine(cnt, mean, m2, n2, mu2, v2)
    n, mu, v = tl.reduce((cnt, mean, m2), 0, _chan_combine)
    tl.store(mean_ptr + row, mu)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(v / n + eps))


@triton.jit
def _apply_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, S, C, CG,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    blk, plane = tl.program_id(0), tl.program_id(1)
    c = plane % C
    group = (plane // C) * (C // CG) + c // CG
    scale = tl.load(rstd_ptr + group)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c).to(tl.float32)
    shift = -tl.load(mean_ptr + group) * scale
    if HAS_B:
        shift += tl.load(b_ptr + c).to(tl.float32)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S
    off = plane.to(tl.int64) * S + idx
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (x * scale + shift).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, part_ptr, S, SPLITS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    split, plane = tl.program_id(0), tl.program_id(1)
    base = plane.to(tl.int64) * S
    lanes = tl.arange(0, BLOCK)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    start = split * CHUNK
    for off in tl.static_range(0, CHUNK, BLOCK):
        idx = start + off + lanes
        mask = idx < S
        dy = tl.load(dy_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        s1 += dy
        s2 += dy * x
    out = part_ptr + (plane.to(tl.int64) * SPLITS + split) * 2
    tl.store(out, tl.sum(s1, axis=0))
    tl.store(out + 1, tl.sum(s2, axis=0))


@triton.jit
def _grad_coeff_kernel(part_ptr, mean_ptr, rstd_ptr, w_ptr, p_ptr, a_ptr, b_ptr, dw_ptr, db_ptr, C, CG, SPLITS, M,
                       HAS_W: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per group (n, g): the channel sums S1 = sum grad_y, S2 = sum grad_y x from the partials, then dx's
    coefficients p = r w, a = r^3 (mu A - B) / M, b2 = -a mu - r A / M with A = sum_c w S1, B = sum_c w S2,
    and each channel's share of dw, r (S2 - mu S1), and of dbias, S1 (summed over the batch afterwards).
    Channel by channel over 1-D vectors of partials (a 2-D (channel x split) tile of one channel row failed
    Triton 3.6's thread-locality pass on sm_90)."""
    row = tl.program_id(0)
    groups = C // CG
    first = (row // groups) * C + (row % groups) * CG  # flat (n, c) index of the group's first channel
    mu = tl.load(mean_ptr + row)
    r = tl.load(rstd_ptr + row)
    # w-weighted partials of the group, lane by lane: loop-carried values keep one type (1-D fp32 tensors)
    gw = tl.zeros([BLOCK_S], dtype=tl.float32)
    gwx = tl.zeros([BLOCK_S], dtype=tl.float32)
    for i in range(CG):
        plane = (first + i).to(tl.int64)
        acc1 = tl.zeros([BLOCK_S], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_S], dtype=tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            mask = sp < SPLITS
            src = part_ptr + (plane * SPLITS + sp) * 2
            acc1 += tl.load(src, mask=mask, other=0.0)
            acc2 += tl.load(src + 1, mask=mask, other=0.0)
        s1 = tl.sum(acc1, axis=0)
        s2 = tl.sum(acc2, axis=0)
        if HAS_W:
            w = tl.load(w_ptr + plane % C).to(tl.float32)
        else:
            w = 1.0
        gw += w * acc1
        gwx += w * acc2
        tl.store(p_ptr + plane, r * w)
        tl.store(dw_ptr + plane, r * (s2 - mu * s1))
        tl.store(db_ptr + plane, s1)
    sum_gw = tl.sum(gw, axis=0)
    sum_gwx = tl.sum(gwx, axis=0)
    a = (mu * sum_gw - sum_gwx) * r * r * r / M
    b2 = -a * mu - r * sum_gw / M
    for i in range(CG):
        tl.store(a_ptr + first + i, a)
        tl.store(b_ptr + first + i, b2)


@triton.jit
def _grad_input_kernel(dy_ptr, x_ptr, dx_ptr, p_ptr, a_ptr, b_ptr, S, BLOCK: tl.constexpr):
    blk, plane = tl.program_id(0), tl.program_id(1)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    mask = idx < S
    off = plane.to(tl.int64) * S + idx
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dx = tl.load(p_ptr + plane) * dy + tl.load(a_ptr + plane) * x + tl.load(b_ptr + plane)
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---- channels-last twins: x[n, s, c] at n S C + s C + c; grids (spatial blocks, channel blocks, N)


@triton.jit
def _cl_tile(s, c, S, C):
    """Offsets within one sample and the mask of a (spatial x channel) tile of a channels-last tensor."""
    return s[:, None].to(tl.int64) * C + c[None, :], (s < S)[:, None] & (c < C)[None, :]


@triton.jit
def _stats_cl_kernel(x_ptr, part_ptr, S, C, SPLITS, ROWS: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    """Welford triples of ROWS spatial positions per channel, stored at part[(n C + c) SPLITS + split]."""
    split, cblk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = x_ptr + n.to(tl.int64) * S * C
    c = cblk * BC + tl.arange(0, BC)
    cnt = tl.zeros([BS, BC], dtype=tl.float32)
    mean = tl.zeros([BS, BC], dtype=tl.float32)
    m2 = tl.zeros([BS, BC], dtype=tl.float32)
    start = split * ROWS
    for off in tl.static_range(0, ROWS, BS):
        idx, mask = _cl_tile(start + off + tl.arange(0, BS), c, S, C)
        cnt, mean, m2 = _welford_step(cnt, mean, m2, tl.load(base + idx, mask=mask, other=0.0).to(tl.float32), mask)
    k, mu, v = tl.reduce((cnt, mean, m2), 0, _chan_combine)
    out = part_ptr + ((n * C + c).to(tl.int64) * SPLITS + split) * 3
    mask_c = c < C
    tl.store(out, k, mask=mask_c)
    tl.store(out + 1, mu, mask=mask_c)
    tl.store(out + 2, v, mask=mask_c)


@triton.jit
def _apply_cl_kernel(x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, S, C, CG,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    sblk, cblk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cblk * BC + tl.arange(0, BC)
    mask_c = c < C
    group = n * (C // CG) + c // CG
    scale = tl.load(rstd_ptr + group, mask=mask_c, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    shift = -tl.load(mean_ptr + group, mask=mask_c, other=0.0) * scale
    if HAS_B:
        shift += tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    idx, mask = _cl_tile(sblk * BS + tl.arange(0, BS), c, S, C)
    off = n.to(tl.int64) * S * C + idx
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (x * scale[None, :] + shift[None, :]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_cl_kernel(dy_ptr, x_ptr, part_ptr, S, C, SPLITS, ROWS: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    split, cblk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    base = n.to(tl.int64) * S * C
    c = cblk * BC + tl.arange(0, BC)
    s1 = tl.zeros([BS, BC], dtype=tl.float32)
    s2 = tl.zeros([BS, BC], dtype=tl.float32)
    start = split * ROWS
    for off in tl.static_range(0, ROWS, BS):
        idx, mask = _cl_tile(start + off + tl.arange(0, BS), c, S, C)
        dy = tl.load(dy_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        s1 += dy
        s2 += dy * x
    out = part_ptr + ((n * C + c).to(tl.int64) * SPLITS + split) * 2
    mask_c = c < C
    tl.store(out, tl.sum(s1, axis=0), mask=mask_c)
    tl.store(out + 1, tl.sum(s2, axis=0), mask=mask_c)


@triton.jit
def _grad_input_cl_kernel(dy_ptr, x_ptr, dx_ptr, p_ptr, a_ptr, b_ptr, S, C, BS: tl.constexpr, BC: tl.constexpr):
    sblk, cblk, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = cblk * BC + tl.arange(0, BC)
    mask_c = c < C
    plane = n * C + c
    p = tl.load(p_ptr + plane, mask=mask_c, other=0.0)[None, :]
    a = tl.load(a_ptr + plane, mask=mask_c, other=0.0)[None, :]
    b2 = tl.load(b_ptr + plane, mask=mask_c, other=0.0)[None, :]
    idx, mask = _cl_tile(sblk * BS + tl.arange(0, BS), c, S, C)
    off = n.to(tl.int64) * S * C + idx
    dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + off, (p * dy + a * x + b2).to(dx_ptr.dtype.element_ty), mask=mask)


def is_channels_last(x: torch.Tensor) -> bool:
    """A 5-D tensor in channels_last_3d memory that is not also plain contiguous (the kernels' ``_cl`` layout)."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def _cl_blocks(c: int, elements: int) -> tuple[int, int]:
    """(spatial rows, channels) of a channels-last tile of about ``elements``: every channel of a narrow map, up
    to 64 contiguous channels of a wide one."""
    bc = min(next_power_of_2(c), 64)
    return max(elements // bc, 1), bc


def _cl_reduction_tile(c: int, s: int) -> tuple[int, int, int, int]:
    """(rows per program, spatial rows per step, channels per program, splits) of a channels-last reduction:
    about CHUNK elements per program, read BLOCK elements at a time."""
    bs, bc = _cl_blocks(c, _reduction_block())
    rows = max(CHUNK // bc, bs)
    return rows, bs, bc, cdiv(s, rows)


def _reduction_block() -> int:
    """Lanes of a reduction program: BLOCK, or CHUNK when smaller; a program reads exactly its CHUNK elements."""
    block = min(BLOCK, CHUNK)
    if CHUNK % block:
        raise ValueError(f"CHUNK ({CHUNK}) must be a multiple of BLOCK ({BLOCK}): a program would read into the next chunk")
    return block


def group_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and rstd (N, G), fp32, of a contiguous or channels-last (N, C, *spatial) tensor's groups."""
    n, c = x.shape[:2]
    rows, m = n * groups, x.numel() // (n * groups)
    if is_channels_last(x):
        s = x[0, 0].numel()
        per_row, bs, bc, splits = _cl_reduction_tile(c, s)
        part = torch.empty(n * c, splits, 3, dtype=torch.float32, device=x.device)
        _stats_cl_kernel[(splits, cdiv(c, bc), n)](x, part, s, c, splits, ROWS=per_row, BS=bs, BC=bc)
        splits *= c // groups  # a group's channels' partials follow one another: one row of the NCDHW layout
    else:
        splits = cdiv(m, CHUNK)
        part = torch.empty(rows, splits, 3, dtype=torch.float32, device=x.device)
        _stats_kernel[(splits, rows)](x, part, m, splits, CHUNK=CHUNK, BLOCK=_reduction_block())
    mean = torch.empty(n, groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _finalize_kernel[(rows,)](part, mean, rstd, splits, eps, BLOCK_S=min(max(next_power_of_2(splits), 16), 1024))
    return mean, rstd


def normalize(x: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
              weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``out = (x - mean[n, g]) rstd[n, g] w[c] + b[c]`` over a contiguous or channels-last (N, C, *spatial) x, into
    ``out`` (of x's layout)."""
    n, c = x.shape[:2]
    planes, s = n * c, x[0, 0].numel()
    if is_channels_last(x):
        bs, bc = _cl_blocks(c, 2 * BLOCK)
        _apply_cl_kernel[(cdiv(s, bs), cdiv(c, bc), n)](
            x, out, mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean, s, c,
            c // mean.shape[1], HAS_W=weight is not None, HAS_B=bias is not None, BS=bs, BC=bc,
        )
        return out
    _apply_kernel[(cdiv(s, BLOCK), planes)](
        x, out, mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean, s, c, c // mean.shape[1],
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK=BLOCK,
    )
    return out


def backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
             need_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype or None, dw and dbias per (N, C) in fp32, to be summed over N) of GroupNorm, from
    ``grad_y`` and ``x`` of one layout (contiguous or channels-last) and the forward's (N, G) mean and rstd: two
    passes over the tensors."""
    n, c = x.shape[:2]
    groups = mean.shape[1]
    s = x[0, 0].numel()
    channels_last = is_channels_last(x)
    if channels_last:
        per_row, bs, bc, splits = _cl_reduction_tile(c, s)
        part = torch.empty(n * c, splits, 2, dtype=torch.float32, device=x.device)
        _grad_sums_cl_kernel[(splits, cdiv(c, bc), n)](grad_y, x, part, s, c, splits, ROWS=per_row, BS=bs, BC=bc)
    else:
        splits = cdiv(s, CHUNK)
        part = torch.empty(n * c, splits, 2, dtype=torch.float32, device=x.device)
        _grad_sums_kernel[(splits, n * c)](grad_y, x, part, s, splits, CHUNK=CHUNK, BLOCK=_reduction_block())
    coeffs = torch.empty(5, n, c, dtype=torch.float32, device=x.device)  # p, a, b2, dw share, dbias share
    _grad_coeff_kernel[(n * groups,)](
        part, mean, rstd, weight if weight is not None else mean, *coeffs, c, c // groups, splits, (c // groups) * s,
        HAS_W=weight is not None, BLOCK_S=min(max(next_power_of_2(splits), 16), COEFF_BLOCK),
    )
    dx = None
    if need_x:
        dx = torch.empty_like(x)  # x's layout
        if channels_last:
            bs, bc = _cl_blocks(c, 2 * BLOCK)
            _grad_input_cl_kernel[(cdiv(s, bs), cdiv(c, bc), n)](grad_y, x, dx, coeffs[0], coeffs[1], coeffs[2], s, c, BS=bs, BC=bc)
        else:
            _grad_input_kernel[(cdiv(s, BLOCK), n * c)](grad_y, x, dx, coeffs[0], coeffs[1], coeffs[2], s, BLOCK=BLOCK)
    return dx, coeffs[3], coeffs[4]


__all__ = ["backward", "group_stats", "is_channels_last", "normalize"]
