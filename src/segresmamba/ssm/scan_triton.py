"""Triton selective scan (Mamba-1 semantics), parallel over chunks of the sequence as well as channels.

The recurrence is the one of :mod:`segresmamba.ssm.scan_torch` (Gu & Dao, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", 2023), per batch b, channel d and state n::

    dt_t = softplus(delta_t + delta_bias)   a_t = exp(dt_t * A)   x_t = dt_t * B_t * u_t
    h_t  = a_t * h_{t-1} + x_t              y_t = (<h_t, C_t> + D * u_t) * silu(z_t)

``h_t = a_t h_{t-1} + x_t`` is a first-order linear recurrence, so the pairs (a, x) compose under the
associative operator ``(a1, x1) . (a2, x2) = (a1 a2, a2 x1 + x2)`` and can be scanned in parallel
(Blelloch, "Prefix Sums and Their Applications", 1990; Martin & Cundy, "Parallelizing Linear Recurrent
Neural Nets Over Sequence Length", ICLR 2018). The mamba_ssm CUDA kernel walks the whole sequence with
one thread block per (batch, channel) row; at batch 1 and ~100 channels that leaves most of an H100
idle. Here the sequence is also cut into chunks of ``chunk`` tokens (the chunked scan of Blelloch's
section 1.4: local scans, a scan of the chunk totals, then a local pass that adds the carry-in):

forward
    1. every (batch, chunk, channel) computes its chunk's final state from a zero state and its total
       decay ``exp(A * sum dt)``; the final state needs no scan, it is the weighted sum
       ``sum_t exp(A * sum_{j>t} dt_j) x_t`` (one exponential per element, exponents <= 0);
    2. a short kernel carries the state across chunk boundaries (a scan over chunks, parallel over
       batch, channel and state): the state entering every chunk, ``(b, nchunks, d, n)`` floats;
    3. every chunk is scanned again from its carried-in state and writes y, with the D skip and the
       silu(z) gate fused.

backward (the same three passes in reverse), with ``g = dy * silu(z)`` and
``dh_t = g_t C_t + a_{t+1} dh_{t+1}``:
    1. every chunk computes the gradient reaching its entering state from inside the chunk,
       ``sum_t exp(A * sum_{j<=t} dt_j) g_t C_t`` (again a weighted sum);
    2. those are carried right to left across chunks;
    3. every chunk recomputes its states from the saved entering state (``tl.associative_scan``),
       scans dh backwards from the carried-in gradient, and writes du, ddelta, dz; dB and dC (shared
       by all channels) accumulate over a group of channels in registers and then atomically; dA, dD
       and ddelta_bias go to one partial row per (batch, chunk), summed afterwards (deterministic).

Only the chunk-entering states are saved for backward, never anything of size L x N. State and
accumulation are fp32 whatever the input dtype (fp32, bf16, fp16); y and the per-token gradients come
back in their tensors' dtypes.

``a_t h_{t-1}``, needed for dA and ddelta, is taken as ``h_t - x_t`` rather than by dividing by a
(which underflows to 0 for long steps).

:func:`chunked_scan_reference` and :func:`chunked_scan_reference_backward` spell out the same three
passes in plain PyTorch, so the algorithm (and every gradient formula) is checked on CPU where Triton
is absent.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from segresmamba.ssm.scan_torch import _check_inputs

try:  # never a hard dependency: the module imports (and registers a lazy backend) without Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

MAX_CHANNEL_GROUP = 16  # channels one program walks through, reusing its B and C tiles
CARRY_ROWS = 64  # chunks per step of the cross-chunk carry
CARRY_LANES = 32  # (channel, state) lanes per carry program
# Launch settings (None: the heuristic of _plan), tuned by perf/scan_bench.py --tune on an H200 (d 96,
# 64^3 tokens, fwd+bwd, results/perf/scan.md). One warp per program over 64-token chunks: the (state x token)
# tiles of a channel then sit in one warp, so the scans and the sums over states are register shuffles with
# no shared-memory barrier; with 4 warps over 128 tokens the states spread over the warps and every such sum
# crossed them (fp32 6.1 ms -> 4.9 ms; 32-token chunks are as fast and need more chunk-state memory).
# upcast: which bf16/fp16 inputs go to the kernels as fp32 copies: "all" (u, delta, B, C and dy), "states"
# (B and C, the (state x token) tiles) or "none". With 4-warp programs over 128 tokens the copies paid (bf16
# 8.2 ms with "none", 6.5 ms with "all": 16-bit tiles are laid out 8 tokens per thread and the backward
# needed more registers); with one warp over 64 tokens "none" is as fast (5.09 vs 5.15 ms) and needs no
# copies (0.54 vs 0.85 GiB). Outputs and gradients keep the inputs' dtypes, and copies live only while the
# kernels run. SEGRESMAMBA_TRITON_SCAN='{"chunk": 128, "warps": 4}' (JSON) overrides the settings at import.
TUNING = {"chunk": 64, "warps": 1, "bwd_warps": None, "bwd_maxnreg": None, "max_group": MAX_CHANNEL_GROUP, "upcast": "none"}
if os.environ.get("SEGRESMAMBA_TRITON_SCAN"):
    TUNING.update(json.loads(os.environ["SEGRESMAMBA_TRITON_SCAN"]))
# sizes that vary between calls compile once rather than once per divisibility class; L is left to
# specialise, so that with L divisible by 16 the masked token-contiguous loads can be vectorised
SIZE_ARGS = ("D_CH", "N", "NCHUNKS", "GROUP")


# ---------------------------------------------------------------------------------------------------
# The chunked algorithm in plain PyTorch (float64-capable): the specification the kernels follow.
# ---------------------------------------------------------------------------------------------------


def _chunk_views(t: torch.Tensor, chunk: int, nchunks: int, fill: float = 0.0) -> torch.Tensor:
    """(..., L) -> (..., nchunks, chunk), padded at the end with ``fill``."""
    pad = nchunks * chunk - t.shape[-1]
    if pad:
        t = F.pad(t, (0, pad), value=fill)
    return t.reshape(*t.shape[:-1], nchunks, chunk)


def _steps(delta, delta_bias, delta_softplus, length, chunk, nchunks):
    """dt per token in chunks (b, d, nc, T), padding positions forced to dt = 0 (an inert step)."""
    raw = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.softplus(raw) if delta_softplus else raw
    return _chunk_views(raw, chunk, nchunks), _chunk_views(dt, chunk, nchunks)


def _scan_from(a, x, h0):
    """h_t = a_t h_{t-1} + x_t along dim -1 (tokens), from h0; a, x (b, d, nc, n, T), h0 (b, d, nc, n)."""
    h, out = h0, []
    for a_t, x_t in zip(a.unbind(-1), x.unbind(-1)):
        h = a_t * h + x_t
        out.append(h)
    return torch.stack(out, dim=-1)


def _reverse_scan_from(a, x, g_end):
    """s_t = a_t s_{t+1} + x_t along dim -1 (tokens), from s_{T} = g_end."""
    s, out = g_end, []
    for a_t, x_t in zip(reversed(a.unbind(-1)), reversed(x.unbind(-1))):
        s = a_t * s + x_t
        out.append(s)
    return torch.stack(out[::-1], dim=-1)


def _chunk_terms(u, delta, A, B, C, delta_bias, delta_softplus, chunk):
    b, d, length = u.shape
    nchunks = max(1, math.ceil(length / chunk))
    raw, dt = _steps(delta, delta_bias, delta_softplus, length, chunk, nchunks)
    dt = dt * _chunk_views(torch.ones_like(u), chunk, nchunks)  # dt = 0 on padding
    u_c = _chunk_views(u, chunk, nchunks)
    B_c = _chunk_views(B, chunk, nchunks)[:, None].permute(0, 1, 3, 2, 4)  # (b, 1, nc, n, T)
    C_c = _chunk_views(C, chunk, nchunks)[:, None].permute(0, 1, 3, 2, 4)
    a = torch.exp(dt[:, :, :, None, :] * A[None, :, None, :, None])  # (b, d, nc, n, T)
    x = (dt * u_c)[:, :, :, None, :] * B_c
    return nchunks, raw, dt, u_c, B_c, C_c, a, x


def _carry_forward(decay, local_end):
    """State entering each chunk (b, d, nc, n) from per-chunk decays and zero-start final states."""
    h = torch.zeros_like(local_end[:, :, 0])
    entering = []
    for k in range(local_end.shape[2]):
        entering.append(h)
        h = decay[:, :, k] * h + local_end[:, :, k]
    return torch.stack(entering, dim=2)


def _local_final_state(dt, A, x):
    """Final state of every chunk from a zero state: sum_t exp(A * sum_{j>t} dt_j) x_t."""
    after = torch.flip(torch.cumsum(torch.flip(dt, [-1]), -1), [-1]) - dt
    return (torch.exp(after[:, :, :, None, :] * A[None, :, None, :, None]) * x).sum(-1)


def chunked_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=4):
    """Forward of the three-pass chunked scan in plain PyTorch; returns (y, chunk-entering states)."""
    length = u.shape[-1]
    nchunks, _, dt, u_c, _, C_c, a, x = _chunk_terms(u, delta, A, B, C, delta_bias, delta_softplus, chunk)
    # pass 1: chunk-local final states (a weighted sum, as the kernel computes it) and total decays
    local_end = _local_final_state(dt, A, x)
    decay = torch.exp(A[None, :, None, :] * dt.sum(-1, keepdim=True))
    # pass 2: carry across chunks
    entering = _carry_forward(decay, local_end)
    # pass 3: rescan from the carried-in state, D skip and gate
    h = _scan_from(a, x, entering)
    y = (h * C_c).sum(3).flatten(2)[..., :length]
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, entering


def chunked_scan_reference_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad_y, chunk=4):
    """Backward of the chunked scan with the kernels' explicit formulas (no autograd).

    Returns the gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None where the input is None.
    """
    b, d, length = u.shape
    nchunks, raw, dt, u_c, B_c, C_c, a, x = _chunk_terms(u, delta, A, B, C, delta_bias, delta_softplus, chunk)
    decay = torch.exp(A[None, :, None, :] * dt.sum(-1, keepdim=True))
    entering = _carry_forward(decay, _local_final_state(dt, A, x))
    dy = _chunk_views(grad_y, chunk, nchunks)
    D_ = torch.zeros(d, dtype=u.dtype) if D is None else D
    ys_needed = z is not None
    if ys_needed:
        z_c = _chunk_views(z, chunk, nchunks)
        sig = torch.sigmoid(z_c)
        g = dy * z_c * sig
    else:
        g = dy
    gC = g[:, :, :, None, :] * C_c  # (b, d, nc, n, T)
    # backward pass 1: gradient reaching each chunk's entering state from inside the chunk,
    # sum_t (prod_{j<=t} a_j) g_t C_t, a weighted sum as in the kernel
    upto = torch.cumsum(dt, -1)
    first = (torch.exp(upto[:, :, :, None, :] * A[None, :, None, :, None]) * gC).sum(-1)
    # backward pass 2: carry right to left; into_end[k] = gradient reaching chunk k's final state
    carry = torch.zeros_like(first[:, :, 0])
    into_end = [None] * nchunks
    for k in reversed(range(nchunks)):
        into_end[k] = carry
        carry = decay[:, :, k] * carry + first[:, :, k]
    into_end = torch.stack(into_end, dim=2)
    # backward pass 3: recompute h, scan dh with shifted decays a_{t+1}
    h = _scan_from(a, x, entering)
    a_next = torch.cat([a[..., 1:], torch.zeros_like(a[..., :1])], dim=-1)
    beta = torch.cat([gC[..., :-1], gC[..., -1:] + into_end[..., None]], dim=-1)  # later chunks enter at the end
    dh = _reverse_scan_from(a_next, beta, torch.zeros_like(into_end))
    decayed_prev = h - x  # a_t h_{t-1}
    Bu = B_c * u_c[:, :, :, None, :]
    du = g * D_[:, None, None] + (dh * B_c).sum(3) * dt
    ddt = (dh * (Bu + A[None, :, None, :, None] * decayed_prev)).sum(3)
    dA = (dh * dt[:, :, :, None, :] * decayed_prev).sum((0, 2, 4))
    dB = (dh * (dt * u_c)[:, :, :, None, :]).sum(1)  # (b, nc, n, T)
    dC = (h * g[:, :, :, None, :]).sum(1)
    ddt_raw = ddt * torch.sigmoid(raw) if delta_softplus else ddt
    valid = _chunk_views(torch.ones_like(u), chunk, nchunks)
    ddt_raw = ddt_raw * valid

    def unchunk(t):
        return t.flatten(-2)[..., :length]

    def unchunk_state(t):  # (b, nc, n, T) -> (b, n, L)
        return t.permute(0, 2, 1, 3).flatten(2)[..., :length]

    dz = None
    if z is not None:
        ys = (h * C_c).sum(3)
        out_pre = ys + D_[:, None, None] * u_c
        dz = unchunk(dy * out_pre * sig * (1 + z_c * (1 - sig)))
    dD = None if D is None else (g * u_c).sum((0, 2, 3))
    dbias = None if delta_bias is None else ddt_raw.sum((0, 2, 3))
    return (unchunk(du), unchunk(ddt_raw), dA, unchunk_state(dB), unchunk_state(dC), dD, dz, dbias)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _combine(a1, x1, a2, x2):
        # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
        return a1 * a2, a2 * x1 + x2

    @triton.jit
    def _token_index(p, code, L, S, M):
        """Address of the p-th token of a scan order (code 0 forward, 1 reverse, 2 inter-slice: S slices
        of M tokens, ``orient(x, "slice", S)[p] = x[(p % S) * M + p // S]``), by index arithmetic."""
        return tl.where(code == 0, p, tl.where(code == 1, L - 1 - p, (p % S) * M + p // S))

    @triton.jit
    def _chunk_tile(k, code, L, N, S, M, T: tl.constexpr, BN: tl.constexpr):
        """Scan positions of chunk k, their addresses in the branch's order, state lanes and masks.

        B and C (and dB, dC) arrive in the branch's scan order and are addressed by the positions; the
        (d x L) tensors stay in the natural order and are addressed by ``_token_index`` of them."""
        offs_t = k * T + tl.arange(0, T)
        offs_n = tl.arange(0, BN)
        mask_t = offs_t < L
        mask_n = offs_n < N
        return offs_t, _token_index(offs_t, code, L, S, M), offs_n, mask_t, mask_n, mask_n[:, None] & mask_t[None, :]

    @triton.jit
    def _load_steps(delta_row, bias_ptr, ch, offs_t, mask_t, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        """(raw, dt) for one channel's chunk; dt = 0 outside the sequence so padding is inert."""
        raw = tl.load(delta_row + offs_t, mask=mask_t, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw = raw + tl.load(bias_ptr + ch).to(tl.float32)
        if SOFTPLUS:
            dt = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw)
        else:
            dt = raw
        dt = tl.where(mask_t, dt, 0.0)
        return raw, dt

    @triton.jit(do_not_specialize=SIZE_ARGS)
    def _fwd_chunk_state_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, end_ptr, decay_ptr, code_ptr,
        D_CH, L, N, NCHUNKS, NB, S, M,
        su_b, su_d, sd_b, sd_d, sA_o, sA_d, sA_n, sB_b, sB_n, sbias_o,
        GROUP, T: tl.constexpr, BN: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        """Pass 1: every chunk's final state from a zero state, and its total decay."""
        pid_g, k, bb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bb64 = bb.to(tl.int64)
        branch = bb // NB
        code = tl.load(code_ptr + branch)
        A_ptr += branch * sA_o
        bias_ptr += branch * sbias_o
        offs_t, idx_t, offs_n, mask_t, mask_n, mask_nt = _chunk_tile(k, code, L, N, S, M, T, BN)
        Bt = tl.load(B_ptr + bb64 * sB_b + offs_n[:, None] * sB_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        ch0 = pid_g * GROUP
        for i in range(GROUP):  # GROUP divides the channel count
            ch = ch0 + i
            u = tl.load(u_ptr + bb64 * su_b + ch * su_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
            _, dt = _load_steps(delta_ptr + bb64 * sd_b + ch * sd_d, bias_ptr, ch, idx_t, mask_t, HAS_BIAS, SOFTPLUS)
            A = tl.load(A_ptr + ch * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(tl.float32)
            # the final state is a weighted sum, no scan needed: h_end = sum_t exp(A * sum_{j>t} dt_j) x_t
            # (the exponent is a suffix sum, <= 0 times A: nothing overflows)
            after = tl.cumsum(dt, axis=0, reverse=True) - dt
            weight = tl.exp(after[None, :] * A[:, None])
            h_end = tl.sum(weight * ((dt * u)[None, :] * Bt), axis=1)
            decay = tl.exp(A * tl.sum(dt, axis=0))
            row = ((bb64 * NCHUNKS + k) * D_CH + ch) * N + offs_n
            tl.store(end_ptr + row, h_end, mask=mask_n)
            tl.store(decay_ptr + row, decay, mask=mask_n)

    @triton.jit(do_not_specialize=("NCHUNKS", "NBLOCKS"))
    def _carry_kernel(
        decay_ptr, local_ptr, out_ptr, NCHUNKS, NBLOCKS, LANES,
        ROWS: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr,
    ):
        """Pass 2: scan ``c_k = decay_k c_{k-1} + local_k`` over chunks (right to left when REVERSE).

        Inputs are (b, nchunks, LANES); the output has nchunks + 1 rows so that a chunk reads its carry
        without an exclusive scan: forward, row k is the state entering chunk k (row 0 = 0); reverse,
        row k + 1 is the gradient reaching chunk k's final state (row nchunks = 0).
        """
        pid_l, bb = tl.program_id(0), tl.program_id(1)
        bb64 = bb.to(tl.int64)
        lanes = pid_l * BLOCK + tl.arange(0, BLOCK)
        mask_l = lanes < LANES
        in_base = bb64 * NCHUNKS * LANES
        out_base = bb64 * (NCHUNKS + 1) * LANES
        rows = tl.arange(0, ROWS)
        carry = tl.zeros([BLOCK], dtype=tl.float32)
        zero_row = NCHUNKS if REVERSE else 0
        tl.store(out_ptr + out_base + zero_row * LANES + lanes, carry, mask=mask_l)
        for i in range(0, NBLOCKS):
            if REVERSE:
                k0 = (NBLOCKS - 1 - i) * ROWS
            else:
                k0 = i * ROWS
            ks = k0 + rows
            mask = (ks < NCHUNKS)[:, None] & mask_l[None, :]
            idx = in_base + ks[:, None] * LANES + lanes[None, :]
            dec = tl.load(decay_ptr + idx, mask=mask, other=1.0)
            loc = tl.load(local_ptr + idx, mask=mask, other=0.0)
            prod, acc = tl.associative_scan((dec, loc), 0, _combine, reverse=REVERSE)
            acc = acc + prod * carry[None, :]
            if REVERSE:
                out_rows = ks
                carry = tl.sum(tl.where(rows[:, None] == 0, acc, 0.0), axis=0)
            else:
                out_rows = ks + 1
                carry = tl.sum(tl.where(rows[:, None] == ROWS - 1, acc, 0.0), axis=0)
            tl.store(out_ptr + out_base + out_rows[:, None] * LANES + lanes[None, :], acc, mask=mask)

    @triton.jit(do_not_specialize=SIZE_ARGS)
    def _fwd_output_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, enter_ptr, y_ptr, code_ptr,
        D_CH, L, N, NCHUNKS, NB, S, M,
        su_b, su_d, sd_b, sd_d, sz_b, sz_d, sy_b, sy_d, sA_o, sA_d, sA_n, sB_b, sB_n, sC_b, sC_n, sD_o, sbias_o,
        GROUP, T: tl.constexpr, BN: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        """Pass 3: rescan each chunk from its carried-in state; y = (<h, C> + D u) * silu(z)."""
        pid_g, k, bb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bb64 = bb.to(tl.int64)
        branch = bb // NB
        zb64 = (bb % NB).to(tl.int64)  # z is shared by the branches of one batch element
        code = tl.load(code_ptr + branch)
        A_ptr += branch * sA_o
        D_ptr += branch * sD_o
        bias_ptr += branch * sbias_o
        offs_t, idx_t, offs_n, mask_t, mask_n, mask_nt = _chunk_tile(k, code, L, N, S, M, T, BN)
        Bt = tl.load(B_ptr + bb64 * sB_b + offs_n[:, None] * sB_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bb64 * sC_b + offs_n[:, None] * sC_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        first = tl.arange(0, T)[None, :] == 0
        ch0 = pid_g * GROUP
        for i in range(GROUP):  # GROUP divides the channel count
            ch = ch0 + i
            u = tl.load(u_ptr + bb64 * su_b + ch * su_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
            _, dt = _load_steps(delta_ptr + bb64 * sd_b + ch * sd_d, bias_ptr, ch, idx_t, mask_t, HAS_BIAS, SOFTPLUS)
            A = tl.load(A_ptr + ch * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(tl.float32)
            h0 = tl.load(enter_ptr + ((bb64 * (NCHUNKS + 1) + k) * D_CH + ch) * N + offs_n, mask=mask_n, other=0.0)
            a = tl.exp(dt[None, :] * A[:, None])
            x = (dt * u)[None, :] * Bt
            x = x + tl.where(first, a * h0[:, None], 0.0)  # the carried-in state enters at the first token
            _, h = tl.associative_scan((a, x), 1, _combine)
            out = tl.sum(h * Ct, axis=0)
            if HAS_D:
                out += tl.load(D_ptr + ch).to(tl.float32) * u
            if HAS_Z:
                z = tl.load(z_ptr + zb64 * sz_b + ch * sz_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
                out = out * z * tl.sigmoid(z)
            tl.store(y_ptr + bb64 * sy_b + ch * sy_d + idx_t, out, mask=mask_t)

    @triton.jit(do_not_specialize=SIZE_ARGS)
    def _bwd_chunk_state_kernel(
        delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, first_ptr, decay_ptr, code_ptr,
        D_CH, L, N, NCHUNKS, NB, S, M,
        sd_b, sd_d, sz_b, sz_d, sg_b, sg_d, sA_o, sA_d, sA_n, sC_b, sC_n, sbias_o,
        GROUP, T: tl.constexpr, BN: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        """Backward pass 1: gradient reaching each chunk's entering state from inside the chunk.

        That is sum_t (prod_{j<=t} a_j) g_t C_t = sum_t exp(A * sum_{j<=t} dt_j) g_t C_t: a weighted sum.
        """
        pid_g, k, bb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bb64 = bb.to(tl.int64)
        branch = bb // NB
        zb64 = (bb % NB).to(tl.int64)
        code = tl.load(code_ptr + branch)
        A_ptr += branch * sA_o
        bias_ptr += branch * sbias_o
        offs_t, idx_t, offs_n, mask_t, mask_n, mask_nt = _chunk_tile(k, code, L, N, S, M, T, BN)
        Ct = tl.load(C_ptr + bb64 * sC_b + offs_n[:, None] * sC_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        ch0 = pid_g * GROUP
        for i in range(GROUP):  # GROUP divides the channel count
            ch = ch0 + i
            _, dt = _load_steps(delta_ptr + bb64 * sd_b + ch * sd_d, bias_ptr, ch, idx_t, mask_t, HAS_BIAS, SOFTPLUS)
            g = tl.load(dy_ptr + bb64 * sg_b + ch * sg_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + zb64 * sz_b + ch * sz_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
                g = g * z * tl.sigmoid(z)
            A = tl.load(A_ptr + ch * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(tl.float32)
            upto = tl.cumsum(dt, axis=0)
            p_first = tl.sum(tl.exp(upto[None, :] * A[:, None]) * (g[None, :] * Ct), axis=1)
            decay = tl.exp(A * tl.sum(dt, axis=0))
            row = ((bb64 * NCHUNKS + k) * D_CH + ch) * N + offs_n
            tl.store(first_ptr + row, p_first, mask=mask_n)
            tl.store(decay_ptr + row, decay, mask=mask_n)

    @triton.jit(do_not_specialize=SIZE_ARGS)
    def _bwd_grad_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, enter_ptr, into_end_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr, code_ptr,
        D_CH, L, N, NCHUNKS, NB, S, M,
        su_b, su_d, sd_b, sd_d, sz_b, sz_d, sg_b, sg_d, so_b, so_d, sA_o, sA_d, sA_n, sB_b, sB_n, sC_b, sC_n, sD_o, sbias_o,
        GROUP, T: tl.constexpr, BN: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        """Backward pass 3: recompute h, scan dh from the carried-in gradient, write every gradient.

        du, ddelta, dz are contiguous (rows, d, L), dz one row per branch and batch element; dB, dC fp32
        (rows, n, L) accumulated atomically; dA/dD/ddelta_bias partials are one row per (row, chunk).
        """
        pid_g, k, bb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        bb64 = bb.to(tl.int64)
        branch = bb // NB
        zb64 = (bb % NB).to(tl.int64)
        code = tl.load(code_ptr + branch)
        A_ptr += branch * sA_o
        D_ptr += branch * sD_o
        bias_ptr += branch * sbias_o
        offs_t, idx_t, offs_n, mask_t, mask_n, mask_nt = _chunk_tile(k, code, L, N, S, M, T, BN)
        tok = tl.arange(0, T)
        idx_next = _token_index(offs_t + 1, code, L, S, M)
        # a_{t+1} for the dh recurrence: within the chunk only, the next chunk enters through into_end
        mask_next = (offs_t + 1 < L) & (tok < T - 1)
        Bt = tl.load(B_ptr + bb64 * sB_b + offs_n[:, None] * sB_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bb64 * sC_b + offs_n[:, None] * sC_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
        first = tok[None, :] == 0
        last = tok[None, :] == T - 1
        dB_acc = tl.zeros([BN, T], dtype=tl.float32)
        dC_acc = tl.zeros([BN, T], dtype=tl.float32)
        part = bb64 * NCHUNKS + k
        ch0 = pid_g * GROUP
        for i in range(GROUP):  # GROUP divides the channel count
            ch = ch0 + i
            delta_row = delta_ptr + bb64 * sd_b + ch * sd_d
            u = tl.load(u_ptr + bb64 * su_b + ch * su_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
            raw, dt = _load_steps(delta_row, bias_ptr, ch, idx_t, mask_t, HAS_BIAS, SOFTPLUS)
            _, dt_next = _load_steps(delta_row, bias_ptr, ch, idx_next, mask_next, HAS_BIAS, SOFTPLUS)
            dy = tl.load(dy_ptr + bb64 * sg_b + ch * sg_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
            A = tl.load(A_ptr + ch * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(tl.float32)
            state_row = (bb64 * (NCHUNKS + 1) + k) * D_CH + ch
            h0 = tl.load(enter_ptr + state_row * N + offs_n, mask=mask_n, other=0.0)
            g_end = tl.load(into_end_ptr + (state_row + D_CH) * N + offs_n, mask=mask_n, other=0.0)

            a = tl.exp(dt[None, :] * A[:, None])
            dtu = dt * u
            x = dtu[None, :] * Bt
            _, h = tl.associative_scan((a, x + tl.where(first, a * h0[:, None], 0.0)), 1, _combine)

            if HAS_D:
                Dc = tl.load(D_ptr + ch).to(tl.float32)
            else:
                Dc = 0.0
            if HAS_Z:
                z = tl.load(z_ptr + zb64 * sz_b + ch * sz_d + idx_t, mask=mask_t, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                out_pre = tl.sum(h * Ct, axis=0) + Dc * u
                dz = dy * out_pre * sig * (1.0 + z * (1.0 - sig))
                tl.store(dz_ptr + bb64 * so_b + ch * so_d + idx_t, dz, mask=mask_t)
                g = dy * z * sig
            else:
                g = dy

            # h and x are not needed past this point: what the gradients use of them is taken now, so
            # that fewer (state x chunk) tiles are live across the second scan
            dC_acc += h * g[None, :]
            decayed_prev = h - x  # a_t h_{t-1}, without dividing by a_t
            a_next = tl.where(mask_next[None, :], tl.exp(dt_next[None, :] * A[:, None]), 0.0)
            beta = g[None, :] * Ct + tl.where(last, g_end[:, None], 0.0)
            _, dh = tl.associative_scan((a_next, beta), 1, _combine, reverse=True)

            du = g * Dc + tl.sum(dh * Bt, axis=0) * dt
            ddt = tl.sum(dh * (Bt * u[None, :] + A[:, None] * decayed_prev), axis=0)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(raw)
            ddt = tl.where(mask_t, ddt, 0.0)
            tl.store(du_ptr + bb64 * so_b + ch * so_d + idx_t, du, mask=mask_t)
            tl.store(ddelta_ptr + bb64 * so_b + ch * so_d + idx_t, ddt, mask=mask_t)
            dB_acc += dh * dtu[None, :]
            dA = tl.sum(dh * dt[None, :] * decayed_prev, axis=1)
            tl.store(dA_part_ptr + (part * D_CH + ch) * N + offs_n, dA, mask=mask_n)
            if HAS_D:
                tl.store(dD_part_ptr + part * D_CH + ch, tl.sum(g * u, axis=0))
            if HAS_BIAS:
                tl.store(dbias_part_ptr + part * D_CH + ch, tl.sum(ddt, axis=0))
        state_idx = bb64 * N * L + offs_n[:, None] * L + offs_t[None, :]
        tl.atomic_add(dB_ptr + state_idx, dB_acc, mask=mask_nt, sem="relaxed")
        tl.atomic_add(dC_ptr + state_idx, dC_acc, mask=mask_nt, sem="relaxed")


def _plan(b: int, d: int, n: int, length: int, chunk: int):
    """Chunk length T (power of two), state block, channels per program, warps."""
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    T = max(16, min(chunk, triton.next_power_of_2(length)))
    nchunks = triton.cdiv(length, T)
    BN = max(2, triton.next_power_of_2(n))
    # channels per program: a divisor of d (no ragged group), as large as keeps the grid several waves deep
    divisors = [g for g in range(min(TUNING["max_group"], d), 0, -1) if d % g == 0]
    group = next((g for g in divisors if b * nchunks * (d // g) >= 2048), 1)
    warps = TUNING["warps"] or (4 if BN * T <= 2048 else 8)
    return T, nchunks, BN, group, warps


def _last_dim_unit(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _run_carry(decay: torch.Tensor, local: torch.Tensor, reverse: bool) -> torch.Tensor:
    b, nchunks, d, n = decay.shape
    out = torch.empty(b, nchunks + 1, d, n, dtype=torch.float32, device=decay.device)
    lanes = d * n
    _carry_kernel[(triton.cdiv(lanes, CARRY_LANES), b)](
        decay, local, out, nchunks, triton.cdiv(nchunks, CARRY_ROWS), lanes, ROWS=CARRY_ROWS, BLOCK=CARRY_LANES, REVERSE=reverse, num_warps=4
    )
    return out


ORIENTATION_CODES = {"forward": 0, "reverse": 1, "slice": 2}
_code_tensors: dict[tuple, torch.Tensor] = {}


UPCAST_MODES = ("all", "states", "none")


def _kernel_inputs(u, delta, B, C, grad_y=None) -> tuple:
    """The tensors the kernels read: fp32 copies of the 16-bit ones that ``TUNING["upcast"]`` names."""
    mode = TUNING["upcast"]
    if mode not in UPCAST_MODES:
        raise ValueError(f"TUNING['upcast'] must be one of {UPCAST_MODES}, got {mode!r}")

    def up(t, on):
        return t.float() if on and t is not None and t.dtype in (torch.bfloat16, torch.float16) else t

    every = mode == "all"
    return up(u, every), up(delta, every), up(B, mode != "none"), up(C, mode != "none"), up(grad_y, every)


def _states_in_scan_order(t: torch.Tensor, codes: tuple[int, ...], nb: int, nslices: int, inverse: bool = False) -> torch.Tensor:
    """B, C (or their gradients) of rows ``r * nb + i`` reordered along L into branch r's scan order
    (``inverse``: back to the natural order). These (n x L) tensors are small next to the (d x L)
    activations, and contiguous in scan order they load as token-contiguous tiles, which keeps every scan
    inside one warp; the activations themselves stay in place and are addressed by index arithmetic."""
    if not any(codes):
        return t
    from segresmamba.ssm.tom import orient, unorient  # tom imports this module

    names = {code: name for name, code in ORIENTATION_CODES.items()}
    reorder = unorient if inverse else orient
    return torch.cat([reorder(t[r * nb:(r + 1) * nb], names[code], nslices) for r, code in enumerate(codes)])


def _codes_on(device: torch.device, codes: tuple[int, ...]) -> torch.Tensor:
    key = (device, codes)
    if key not in _code_tensors:  # one small host-to-device copy per (device, orientation set)
        _code_tensors[key] = torch.tensor(codes, dtype=torch.int32, device=device)
    return _code_tensors[key]


class SelectiveScanTritonFn(torch.autograd.Function):
    """Chunk-parallel selective scan of R branches x nb batch elements in one launch per pass.

    Rows ``r * nb + i`` of u, delta (R nb, d, L) and B, C (R nb, n, L) belong to branch r, whose
    parameters are ``A[r]`` (d, n), ``D[r]``, ``delta_bias[r]`` (d) and whose scan order is ``codes[r]``
    (0 forward, 1 reverse, 2 inter-slice over ``nslices`` slices). The (d x L) tensors stay in their
    natural token order, read and written by index arithmetic, and y comes back in it; only B and C
    (n x L, with n = d_state much smaller than d) are copied into each branch's scan order for the kernels.
    z (nb, d, L) is shared by the branches. Saves the inputs and the chunk-entering states only.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, codes, nb, nslices, chunk):
        u_in, delta_in, B_in, C_in, z = (_last_dim_unit(t) for t in (u, delta, B, C, z))
        D, delta_bias = _last_dim_unit(D), _last_dim_unit(delta_bias)  # (R, d): the kernels index channels directly
        u, delta, B, C, _ = _kernel_inputs(u_in, delta_in, B_in, C_in)
        rows, d, length = u.shape
        B, C = (_states_in_scan_order(t, codes, nb, nslices) for t in (B, C))
        n = A.shape[-1]
        seg = length // nslices
        code_t = _codes_on(u.device, codes)
        T, nchunks, BN, group, warps = _plan(rows, d, n, length, chunk)
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
        # the 16-bit originals, not the kernels' fp32 copies: the backward makes its own copies
        ctx.save_for_backward(u_in, delta_in, A, B_in, C_in, D, z, delta_bias, entering)
        ctx.delta_softplus = delta_softplus
        ctx.plan = (T, nchunks, BN, group, warps)
        ctx.layout = (codes, nb, nslices)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        u_in, delta_in, A, B_in, C_in, D, z, delta_bias, entering = ctx.saved_tensors
        T, nchunks, BN, group, warps = ctx.plan
        codes, nb, nslices = ctx.layout
        branches = len(codes)
        u, delta, B, C, grad_y = _kernel_inputs(u_in, delta_in, B_in, C_in, _last_dim_unit(grad_y))
        rows, d, length = u.shape
        B, C = (_states_in_scan_order(t, codes, nb, nslices) for t in (B, C))
        n = A.shape[-1]
        seg = length // nslices
        code_t = _codes_on(u.device, codes)
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
            GROUP=group, T=T, BN=BN, HAS_Z=has_z, HAS_BIAS=has_bias, SOFTPLUS=ctx.delta_softplus, num_warps=warps,
        )
        into_end = _run_carry(decay, first, reverse=True)
        del first, decay

        du = torch.empty(rows, d, length, dtype=u_in.dtype, device=u.device)
        ddelta = torch.empty(rows, d, length, dtype=delta_in.dtype, device=u.device)
        # one dz row per (branch, batch element); the branches' shares are summed below
        dz = torch.empty(rows, d, length, dtype=z.dtype, device=u.device) if has_z else du
        dB = torch.zeros(rows, n, length, **f32)
        dC = torch.zeros(rows, n, length, **f32)
        dA_part = torch.empty(rows * nchunks, d, n, **f32)
        dD_part = torch.empty(rows * nchunks, d, **f32) if has_d else dA_part
        dbias_part = torch.empty(rows * nchunks, d, **f32) if has_bias else dA_part
        _bwd_grad_kernel[grid](
            u, delta, A, B, C, D if has_d else u, zz, bias, grad_y, entering, into_end,
            du, ddelta, dz, dB, dC, dA_part, dD_part, dbias_part, code_t,
            d, length, n, nchunks, nb, nslices, seg,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), zz.stride(0), zz.stride(1),
            grad_y.stride(0), grad_y.stride(1), du.stride(0), du.stride(1),
            A.stride(0), A.stride(1), A.stride(2), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
            D.stride(0) if has_d else 0, sbias,
            GROUP=group, T=T, BN=BN, HAS_D=has_d, HAS_Z=has_z, HAS_BIAS=has_bias, SOFTPLUS=ctx.delta_softplus,
            num_warps=TUNING["bwd_warps"] or warps,
            **({"maxnreg": TUNING["bwd_maxnreg"]} if TUNING["bwd_maxnreg"] else {}),
        )

        def per_branch(part):  # (rows * nchunks, ...) partial rows -> (branches, ...)
            return part.view(branches, -1, *part.shape[1:]).sum(1)

        if has_z:
            dz = dz if branches == 1 else dz.view(branches, nb, d, length).sum(0, dtype=torch.float32).to(z.dtype)
        dB, dC = (_states_in_scan_order(t, codes, nb, nslices, inverse=True) for t in (dB, dC))
        return (
            du, ddelta, per_branch(dA_part).to(A.dtype), dB.to(B_in.dtype), dC.to(C_in.dtype),
            per_branch(dD_part).to(D.dtype) if has_d else None, dz if has_z else None,
            per_branch(dbias_part).to(delta_bias.dtype) if has_bias else None, None, None, None, None, None,
        )


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
    if not HAS_TRITON:
        raise RuntimeError("selective_scan_triton needs the triton package")
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
    :func:`segresmamba.ssm.tom.slice_interleave` with ``nslices``) by index arithmetic, without permuted
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
    if not HAS_TRITON:
        raise RuntimeError("oriented_scan_triton needs the triton package")
    branches, b, d, length = u.shape
    if len(orientations) != branches or any(o not in ORIENTATION_CODES for o in orientations):
        raise ValueError(f"orientations must name the {branches} branches with {tuple(ORIENTATION_CODES)}, got {orientations}")
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

    def rows(t):  # (R, b, c, L) -> (R b, c, L), a view when the first two dims are contiguous
        return t.reshape(branches * b, *t.shape[2:])

    chunk = TUNING["chunk"] if chunk is None else chunk
    codes = tuple(ORIENTATION_CODES[o] for o in orientations)
    y = SelectiveScanTritonFn.apply(
        rows(u), rows(delta), A, rows(B), rows(C), D, z, delta_bias, bool(delta_softplus), codes, b, nslices, chunk,
    )
    return y.view(branches, b, d, length)


def load():
    """Backend loader for :func:`segresmamba.ssm.scan.register_scan_backend`."""
    if not HAS_TRITON:
        raise ImportError("triton is not installed")
    if not torch.cuda.is_available():
        raise RuntimeError("the Triton scan needs a CUDA device")
    return selective_scan_triton


def register() -> None:
    """Make ``scan_backend="triton"`` available; in the ``auto`` order it comes after mamba_ssm (which
    measured as fast or faster in bf16 at most ToM sizes, results/perf/scan.md) and before torch."""
    from segresmamba.ssm.scan import register_scan_backend, scan_backends

    if "triton" not in scan_backends():  # registering twice would list it twice in the auto order
        register_scan_backend("triton", load, cuda_only=True, prefer_on_cuda=False)


register()  # at import; the loader itself is lazy, so this never fails without Triton or CUDA
