"""The Triton kernels of the selective scan and of the fused ToM branches' causal conv (``@triton.jit`` only).

Imports Triton: loaded on the first use of the Triton path, never at ``import segresmamba``. The algorithm
and its notation are in :mod:`segresmamba.ssm.triton.reference`; the launches, in
:mod:`segresmamba.ssm.triton.autograd` (scan) and :mod:`segresmamba.ssm.triton.fused_tom` (conv).

Every kernel serves R branches of b batch elements in one launch: program row ``r * NB + i`` is branch r,
batch element i, and reads its orientation code (:func:`segresmamba.ssm.orientations.orientation_codes`)
from ``code_ptr[r]``. B and C (and dB, dC) arrive in the branch's scan order and are addressed by scan
position; the (channels x tokens) tensors stay in the natural token order and are addressed through
``_token_index``. State and accumulation are fp32 whatever the input dtype.

Scan (per chunk of T tokens, a group of GROUP channels per program; the carry kernel runs between):

- ``_fwd_chunk_state_kernel``: forward pass 1, each chunk's final state from a zero state and its decay;
- ``_carry_kernel``: pass 2 (forward and backward), the scan over chunks;
- ``_fwd_output_kernel``: forward pass 3, rescan from the carried-in state, y with D skip and silu(z) gate;
- ``_bwd_chunk_state_kernel``: backward pass 1, gradient reaching each chunk's entering state;
- ``_bwd_grad_kernel``: backward pass 3, recompute h (``tl.associative_scan``), scan dh backwards, write
  du, ddelta, dz; dB and dC accumulate over a group of channels in registers and then atomically; dA, dD
  and ddelta_bias go to one partial row per (batch, chunk), summed afterwards (deterministic).

Causal depthwise conv + SiLU along each branch's scan order (the equations are in
:mod:`segresmamba.ssm.triton.fused_tom`): ``_conv_fwd_kernel``, ``_conv_bwd_pre_kernel``, ``_conv_bwd_dx_kernel``.

The fused ToM layer's gate, applied once to the sum of its branches (they share z): ``_gate_fwd_kernel`` (the
branch sum and ``sum * silu(z)``), ``_gate_bwd_kernel`` (the gradient its scans receive, and dz).
"""

from __future__ import annotations

import triton
import triton.language as tl

from segresmamba.ssm.orientations import ORIENTATIONS

# the orientation codes the kernels branch on (anything else is the inter-slice order)
FORWARD_CODE = tl.constexpr(ORIENTATIONS.index("forward"))
REVERSE_CODE = tl.constexpr(ORIENTATIONS.index("reverse"))
# sizes that vary between calls compile once rather than once per divisibility class; L is left to
# specialise, so that with L divisible by 16 the masked token-contiguous loads can be vectorised
SIZE_ARGS = ("D_CH", "N", "NCHUNKS", "GROUP")
# decays exp(dt A) are taken as exp2(dt A log2 e), with log2 e folded into A once per channel: Triton's tl.exp
# costs five sm_90 instructions per element (a scaling, and a range test and two fix-ups for denormal results),
# tl.math.exp2 one (ex2.approx.ftz; a decay below 1e-38 becomes 0). mamba_ssm's kernels do the same
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 (a1 h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _token_index(p, code, L, S, M):
    """Address of the p-th token of a scan order (forward, reverse, or inter-slice: S slices of M tokens,
    ``orient(x, "slice", S)[p] = x[(p % S) * M + p // S]``), by index arithmetic."""
    return tl.where(code == FORWARD_CODE, p, tl.where(code == REVERSE_CODE, L - 1 - p, (p % S) * M + p // S))


@triton.jit
def _scan_position(n, slice_of_n, code, L, S, M):
    """Inverse of :func:`_token_index`: the scan position of natural token n, given its slice (n // M, computed once
    by the caller, which needs it for :func:`_tap_frame` too; inter-slice: n = s M + m is visited at p = m S + s)."""
    return tl.where(code == FORWARD_CODE, n, tl.where(code == REVERSE_CODE, L - 1 - n, (n - slice_of_n * M) * S + slice_of_n))


@triton.jit
def _tap_frame(slice_of_n, code, S, M, K: tl.constexpr):
    """What :func:`_tap_index` needs of an order, computed once per program and branch from n's slice (n // M): the
    tokens one scan position moves (forward 1, reverse -1, inter-slice M), the slice and the slice count. The
    forward and reverse orders get slice K of 2^30 slices, so that no tap of a width-K conv wraps in them."""
    is_slice = (code != FORWARD_CODE) & (code != REVERSE_CODE)
    step = tl.where(code == FORWARD_CODE, 1, tl.where(code == REVERSE_CODE, -1, M))
    return step, tl.where(is_slice, slice_of_n, K), tl.where(is_slice, S, 1 << 30)


@triton.jit
def _tap_index(n, j, frame, L):
    """Address of the token j scan positions after natural token n (before it for j < 0), with no division: j steps
    on, wrapping once into the next (previous) run of slices in the inter-slice order, -+(L - 1). Needs |j| < S."""
    step, s, slices = frame
    t = s + j
    return n + j * step + tl.where(t >= slices, 1 - L, tl.where(t < 0, L - 1, 0))


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
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(t), t = exp(-|x|) in (0, 1], with log1p(t) = 2 atanh(s) for
    s = t / (2 + t) in (0, 1/3] summed to s^13 (the next term is below 2e-8 of the sum).

    One exponential and one division. Relative error within 4e-6 of float64 from x = -60 up (a float32 emulation;
    the tests hold it to 1e-5 on the GPU and under the interpreter), also where 1 + exp(x) rounds to 1 (x below
    about -17, where log(1 + exp(x)) gives 0). That formula's logarithm is a polynomial of about 20 sm_90
    instructions, and Triton 3.6 evaluates the step sizes in the (state x token) tile's layout, 8 tokens per thread
    where 3.9 takes 2: replacing it cut the output kernel's loop from 709 to 623 instructions and the mirrored
    backward's from 1,697 to 1,526 under 3.6 (`perf.kernel_resources`)."""
    t = tl.math.exp2(-tl.abs(x) * LOG2E)
    s = t / (2.0 + t)
    w = s * s
    series = 1.0 + w * (1.0 / 3.0 + w * (1.0 / 5.0 + w * (1.0 / 7.0 + w * (1.0 / 9.0 + w * (1.0 / 11.0 + w * (1.0 / 13.0))))))
    return tl.maximum(x, 0.0) + 2.0 * s * series


@triton.jit
def _load_steps(delta_row, bias_ptr, ch, offs_t, mask_t, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt) for one channel's chunk; dt = 0 outside the sequence so padding is inert."""
    raw = tl.load(delta_row + offs_t, mask=mask_t, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + tl.load(bias_ptr + ch).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    dt = tl.where(mask_t, dt, 0.0)
    return raw, _kept_in_row_layout(dt)


@triton.jit
def _kept_in_row_layout(x):
    """``x`` unchanged, behind a loop that runs once, so that Triton computes it in its own layout and moves it.

    A token row is loaded a few tokens per thread, but the tiles that use it hold more tokens per thread, the same
    ones on several threads: the scan's (state x token) tiles 8 tokens per thread, repeated on 4 thread rows;
    Triton 3.6 lays the oriented conv's (channel x token) loads out along the channels, 16 tokens per thread,
    repeated on 16 threads. Triton 3.6 then recomputes the whole chain that made the row (for the step sizes: load,
    bias, softplus; for a conv tap: its address and validity) in the tile's layout, rather than move the finished
    row. Its layout pass does not rematerialise through an ``scf.while``, so behind one the row is computed once and
    moved, as Triton 3.9 chooses by itself for the step sizes.

    Compiled for sm_90 by Triton 3.6.0 (`perf.kernel_resources`): the fused layer's output kernel loop 623 -> 464
    instructions, its mirrored backward 1,526 -> 1,328, the conv forward 1,736 -> 1,176; under Triton 3.9.0 the
    scan kernels stay within 4 instructions and the conv forward falls 944 -> 888. On H200s under Triton 3.6
    (`results/perf/scan_notes.md`, run 29): the scan backward and output kernels 7.85 -> 6.60 and 2.31 -> 1.91 ms
    per BraTS training step (two machines), the conv forward 0.44 -> 0.37 ms for a C48 ToM layer on 64^3 tokens
    (one machine). ``once`` is 0 where it is added: it changes no value (at most -0.0 into 0.0) and makes the
    loop carry the row, where a constant would fold away."""
    once = 0
    while once < 1:
        x = x + once
        once += 1
    return x


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
        A2 = tl.load(A_ptr + ch * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(tl.float32) * LOG2E
        # the final state is a weighted sum, no scan needed: h_end = sum_t exp(A * sum_{j>t} dt_j) x_t
        # (the exponent is a suffix sum, <= 0 times A: nothing overflows)
        after = tl.cumsum(dt, axis=0, reverse=True) - dt
        weight = tl.math.exp2(after[None, :] * A2[:, None])
        h_end = tl.sum(weight * ((dt * u)[None, :] * Bt), axis=1)
        decay = tl.math.exp2(A2 * tl.sum(dt, axis=0))
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
            # tile row p is chunk k0 + ROWS - 1 - p: right to left is then a forward scan over the rows, read and
            # written in that order (a reverse tl.associative_scan would flip the tiles across the lanes: under
            # Triton 3.6 this loop then had 1,096 sm_90 instructions with 394 shuffles, against 779 with 74)
            ks = (NBLOCKS - 1 - i) * ROWS + (ROWS - 1 - rows)
            out_rows = ks
        else:
            ks = i * ROWS + rows
            out_rows = ks + 1
        mask = (ks < NCHUNKS)[:, None] & mask_l[None, :]
        idx = in_base + ks[:, None] * LANES + lanes[None, :]
        dec = tl.load(decay_ptr + idx, mask=mask, other=1.0)
        loc = tl.load(local_ptr + idx, mask=mask, other=0.0)
        prod, acc = tl.associative_scan((dec, loc), 0, _combine)
        acc = acc + prod * carry[None, :]
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
        A2 = tl.load(A_ptr + ch * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(tl.float32) * LOG2E
        h0 = tl.load(enter_ptr + ((bb64 * (NCHUNKS + 1) + k) * D_CH + ch) * N + offs_n, mask=mask_n, other=0.0)
        a = tl.math.exp2(dt[None, :] * A2[:, None])
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
        A2 = tl.load(A_ptr + ch * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(tl.float32) * LOG2E
        upto = tl.cumsum(dt, axis=0)
        p_first = tl.sum(tl.math.exp2(upto[None, :] * A2[:, None]) * (g[None, :] * Ct), axis=1)
        decay = tl.math.exp2(A2 * tl.sum(dt, axis=0))
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
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, MIRROR: tl.constexpr,
):
    """Backward pass 3: recompute h, scan dh from the carried-in gradient, write every gradient.

    du, ddelta, dz are contiguous (rows, d, L), dz one row per branch and batch element; dB, dC fp32
    (rows, n, L) accumulated atomically; dA/dD/ddelta_bias partials are one row per (row, chunk).

    The dh recurrence runs right to left. Triton before 3.9 lowers a reverse ``tl.associative_scan`` by flipping its
    two operand tiles and its two result tiles across the warp's lanes: 480 of this kernel's 598 shuffles per
    channel under 3.6 (sm_90 SASS, one warp over 64 tokens). With MIRROR (:func:`~segresmamba.ssm.triton.tuning.
    mirrored_backward`) the recurrence is a forward scan of the chunk read backwards: its operands come from two
    flipped token rows and from C flipped once per program, and only dh is flipped back, so the rest of the kernel,
    its registers and its spills are unchanged (the fused layer's loop: 1,697 instructions against 2,262 under
    Triton 3.6; on an H200 the scan of d 96 over 64^3 tokens, bf16 fwd+bwd, 4.0 against 4.3 ms, git bd8b6f3). An
    earlier mirrored form (git f55e222) flipped a tile of the h side and four rows per channel and kept B and C both
    ways; it spilled more and measured slower.
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
    # dt_{t+1} for the dh recurrence, read within the chunk only (the next chunk enters through into_end)
    mask_next = (offs_t + 1 < L) & (tok < T - 1)
    Bt = tl.load(B_ptr + bb64 * sB_b + offs_n[:, None] * sB_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bb64 * sC_b + offs_n[:, None] * sC_n + offs_t[None, :], mask=mask_nt, other=0.0).to(tl.float32)
    first = tok[None, :] == 0
    last = tok[None, :] == T - 1
    if MIRROR:
        C_m = tl.flip(Ct, 1)  # the chunk read backwards, once per program (C natural serves only the gate's dz)
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

        A2 = A * LOG2E
        a = tl.math.exp2(dt[None, :] * A2[:, None])
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
        # a_{t+1}; 1 past the chunk or the sequence (dt_next masked to 0), where nothing reads it: the chunk's last
        # token starts the right-to-left scan, and past the sequence beta and dh are 0
        if MIRROR:
            # on the chunk read backwards the right-to-left recurrence is a forward scan: its operands are built from
            # two flipped token rows and the flipped C, and only its result is flipped back
            a_next = tl.math.exp2(tl.flip(dt_next, 0)[None, :] * A2[:, None])
            beta = tl.flip(g, 0)[None, :] * C_m + tl.where(first, g_end[:, None], 0.0)
            _, dh = tl.associative_scan((a_next, beta), 1, _combine)
            dh = tl.flip(dh, 1)
        else:
            a_next = tl.math.exp2(dt_next[None, :] * A2[:, None])
            beta = g[None, :] * Ct + tl.where(last, g_end[:, None], 0.0)
            _, dh = tl.associative_scan((a_next, beta), 1, _combine, reverse=True)

        dh_B = tl.sum(dh * Bt, axis=0)
        dh_dp = dh * decayed_prev
        du = g * Dc + dh_B * dt
        ddt = u * dh_B + tl.sum(A[:, None] * dh_dp, axis=0)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(mask_t, ddt, 0.0)
        tl.store(du_ptr + bb64 * so_b + ch * so_d + idx_t, du, mask=mask_t)
        tl.store(ddelta_ptr + bb64 * so_b + ch * so_d + idx_t, ddt, mask=mask_t)
        dB_acc += dh * dtu[None, :]
        dA = tl.sum(dh_dp * dt[None, :], axis=1)
        tl.store(dA_part_ptr + (part * D_CH + ch) * N + offs_n, dA, mask=mask_n)
        if HAS_D:
            tl.store(dD_part_ptr + part * D_CH + ch, tl.sum(g * u, axis=0))
        if HAS_BIAS:
            tl.store(dbias_part_ptr + part * D_CH + ch, tl.sum(ddt, axis=0))
    state_idx = bb64 * N * L + offs_n[:, None] * L + offs_t[None, :]
    tl.atomic_add(dB_ptr + state_idx, dB_acc, mask=mask_nt, sem="relaxed")
    tl.atomic_add(dC_ptr + state_idx, dC_acc, mask=mask_nt, sem="relaxed")


@triton.jit
def _tap(n, frame, p, j, code, L, S, M, NEAR: tl.constexpr, MOVED: tl.constexpr):
    """The token j scan positions from natural token n (at scan position p; ``frame``: :func:`_tap_frame`): its
    address and whether it exists (a position in [0, L), and n itself inside the sequence). ``NEAR``: |j| < S
    holds, so :func:`_tap_index` finds it without dividing. ``MOVED``: both computed once per token and moved to
    the loads' layout (:func:`_kept_in_row_layout`); on an H200 under Triton 3.6 that made the forward kernel
    faster (0.44 -> 0.37 ms for a C48 ToM layer on 64^3 tokens) and both backward kernels slower (0.52 -> 0.60 and
    0.61 -> 0.65 ms), so only the forward moves them."""
    q = p + j
    valid = (q >= 0) & (q < L) & (n < L)
    if NEAR:
        idx = _tap_index(n, j, frame, L)
    else:
        idx = _token_index(q, code, L, S, M)
    if MOVED:
        return _kept_in_row_layout(idx), _kept_in_row_layout(valid.to(tl.int32)) != 0
    return idx, valid


@triton.jit
def _conv_pre(x_row, w_row, bias_row, n, frame, p, ch, mask_d, code, L, S, M, sx_d, sx_l, sw_d,
              K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NEAR: tl.constexpr, MOVED: tl.constexpr):
    """Pre-activation (BD channels x BT natural tokens n, at scan positions p) of one branch's causal conv, in fp32."""
    acc = tl.zeros([BD, BT], dtype=tl.float32) + tl.load(bias_row + ch, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        idx, valid = _tap(n, frame, p, k - (K - 1), code, L, S, M, NEAR, MOVED)
        xv = tl.load(x_row + ch[:, None] * sx_d + idx[None, :] * sx_l, mask=mask_d[:, None] & valid[None, :], other=0.0)
        wk = tl.load(w_row + ch * sw_d + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += wk[:, None] * xv.to(tl.float32)
    return acc


# The conv kernels tile natural token indices n (and find each one's scan position p): every load and store
# of a (channels x tokens) tensor is then contiguous along the tokens in every order. A tap's neighbour in the
# inter-slice order is the same position of the previous slice, M tokens away, itself contiguous in n. Where
# the conv is no wider than the slice count (``NEAR``), each tap's address comes from n and its slice by additions
# (``_tap_frame``, ``_tap_index``): the per-tap integer divisions of ``_token_index`` were most of these kernels'
# instructions. L and D_CH specialise (divisible by 16 or not: at most four builds per kernel), so that the
# channel-contiguous loads of x and the token-contiguous stores vectorise, 16 bytes at a time. The dx kernel finds
# n's slice once for all branches and runs its taps as a loop, which halves its registers. Instructions a program
# executes, as launched for a C48 ToM layer on 64^3 tokens (sm_90 SASS, Triton 3.6, `perf.triton_ab build`): the
# forward 1,144 -> 840, the pre-activation backward 2,648 -> 1,872 (240 -> 146 registers), the dx kernel about
# 6,000 -> 4,400 (168 -> 124 registers).


@triton.jit(do_not_specialize=("NB", "S", "M"))
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, u_ptr, code_ptr,
    L, D_CH, NB, S, M,
    sx_b, sx_d, sx_l, sw_o, sw_d, sb_o, su_r, su_d,
    K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NEAR: tl.constexpr,
):
    pid_t, pid_d, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    branch = row // NB
    xb = (row % NB).to(tl.int64)
    code = tl.load(code_ptr + branch)
    n = pid_t * BT + tl.arange(0, BT)
    slice_of_n = n // M
    p = _scan_position(n, slice_of_n, code, L, S, M)
    ch = pid_d * BD + tl.arange(0, BD)
    mask_d = ch < D_CH
    acc = _conv_pre(x_ptr + xb * sx_b, w_ptr + branch * sw_o, bias_ptr + branch * sb_o, n, _tap_frame(slice_of_n, code, S, M, K),
                    p, ch, mask_d, code, L, S, M, sx_d, sx_l, sw_d, K, BT, BD, NEAR, True)
    out = acc * tl.sigmoid(acc)
    mask = mask_d[:, None] & (n < L)[None, :]
    tl.store(u_ptr + row.to(tl.int64) * su_r + ch[:, None] * su_d + n[None, :], out, mask=mask)


@triton.jit(do_not_specialize=("NB", "S", "M", "NT"))
def _conv_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, gu_ptr, gp_ptr, dw_part_ptr, db_part_ptr, code_ptr,
    L, D_CH, NB, S, M, NT,
    sx_b, sx_d, sx_l, sw_o, sw_d, sb_o, sg_r, sg_d,
    K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NEAR: tl.constexpr,
):
    """gp (natural order, stored in its pointer's dtype) = g * silu'(pre); partial dw, dbias per (row, token block),
    summed from the fp32 values."""
    pid_t, pid_d, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    branch = row // NB
    xb = (row % NB).to(tl.int64)
    row64 = row.to(tl.int64)
    code = tl.load(code_ptr + branch)
    n = pid_t * BT + tl.arange(0, BT)
    slice_of_n = n // M
    frame = _tap_frame(slice_of_n, code, S, M, K)
    p = _scan_position(n, slice_of_n, code, L, S, M)
    ch = pid_d * BD + tl.arange(0, BD)
    mask_d = ch < D_CH
    acc = _conv_pre(x_ptr + xb * sx_b, w_ptr + branch * sw_o, bias_ptr + branch * sb_o, n, frame, p, ch, mask_d, code,
                    L, S, M, sx_d, sx_l, sw_d, K, BT, BD, NEAR, False)
    sig = tl.sigmoid(acc)
    mask = mask_d[:, None] & (n < L)[None, :]
    g = tl.load(gu_ptr + row64 * sg_r + ch[:, None] * sg_d + n[None, :], mask=mask, other=0.0).to(tl.float32)
    gp = tl.where(mask, g * sig * (1.0 + acc * (1.0 - sig)), 0.0)
    tl.store(gp_ptr + row64 * L * D_CH + ch[:, None] * L + n[None, :], gp, mask=mask)
    part = (row64 * NT + pid_t) * D_CH + ch
    tl.store(db_part_ptr + part, tl.sum(gp, axis=1), mask=mask_d)
    for k in tl.static_range(K):
        idx, valid = _tap(n, frame, p, k - (K - 1), code, L, S, M, NEAR, False)
        xv = tl.load(x_ptr + xb * sx_b + ch[:, None] * sx_d + idx[None, :] * sx_l, mask=mask_d[:, None] & valid[None, :], other=0.0)
        tl.store(dw_part_ptr + part * K + k, tl.sum(gp * xv.to(tl.float32), axis=1), mask=mask_d)


@triton.jit(do_not_specialize=("NB", "NR", "S", "M"))
def _conv_bwd_dx_kernel(
    w_ptr, gp_ptr, dx_ptr, code_ptr,
    L, D_CH, NB, NR, S, M,
    sw_o, sw_d,
    K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, NEAR: tl.constexpr,
):
    """dx of batch element i at natural tokens n, summed over the NR branches in registers and stored in dx's
    dtype: branch r, at scan position q of n, adds sum_k w[r, k] gp[r i, idx(q + K - 1 - k)]."""
    pid_t, pid_d, xb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_t * BT + tl.arange(0, BT)
    slice_of_n = n // M  # once for all branches
    ch = pid_d * BD + tl.arange(0, BD)
    mask_d = ch < D_CH
    acc = tl.zeros([BD, BT], dtype=tl.float32)
    for branch in range(NR):
        row64 = (branch * NB + xb).to(tl.int64)
        code = tl.load(code_ptr + branch)
        q = _scan_position(n, slice_of_n, code, L, S, M)
        frame = _tap_frame(slice_of_n, code, S, M, K)
        for k in range(K):  # not unrolled: the four taps' tiles live at once took about twice the registers
            idx, valid = _tap(n, frame, q, (K - 1) - k, code, L, S, M, NEAR, False)
            gp = tl.load(gp_ptr + row64 * L * D_CH + ch[:, None] * L + idx[None, :], mask=mask_d[:, None] & valid[None, :], other=0.0).to(tl.float32)
            wk = tl.load(w_ptr + branch * sw_o + ch * sw_d + k, mask=mask_d, other=0.0).to(tl.float32)
            acc += wk[:, None] * gp
    mask = mask_d[:, None] & (n < L)[None, :]
    tl.store(dx_ptr + xb.to(tl.int64) * L * D_CH + ch[:, None] * L + n[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=("NB",))
def _gate_fwd_kernel(
    y_ptr, z_ptr, ysum_ptr, out_ptr,
    L, D_CH, NB,
    sy_r, sy_d, sz_b, sz_d, sz_l, so_b, so_d,
    R: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """ysum[i] = sum over the R branches of y[r i] (fp32 sum, stored in ysum's dtype) and out[i] = ysum[i] silu(z[i])
    (the stored sum gated in fp32, as ``_gate_bwd_kernel`` recomputes it bit for bit), at tokens n and channels ch of
    batch element i. y and the outputs have unit token stride; z is read through its strides (a view of the input
    projection's output: channel-contiguous)."""
    pid_t, pid_d, xb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = pid_t * BT + tl.arange(0, BT)
    ch = pid_d * BD + tl.arange(0, BD)
    mask = (ch < D_CH)[:, None] & (n < L)[None, :]
    acc = tl.zeros([BD, BT], dtype=tl.float32)
    for r in tl.static_range(R):
        row64 = (r * NB + xb).to(tl.int64)
        acc += tl.load(y_ptr + row64 * sy_r + ch[:, None] * sy_d + n[None, :], mask=mask, other=0.0).to(tl.float32)
    xb64 = xb.to(tl.int64)
    z = tl.load(z_ptr + xb64 * sz_b + ch[:, None] * sz_d + n[None, :].to(tl.int64) * sz_l, mask=mask, other=0.0).to(tl.float32)
    gate = z * (1.0 / (1.0 + tl.exp(-z)))
    ysum = acc.to(ysum_ptr.dtype.element_ty)
    at = xb64 * so_b + ch[:, None] * so_d + n[None, :]
    tl.store(ysum_ptr + at, ysum, mask=mask)
    tl.store(out_ptr + at, ysum.to(tl.float32) * gate, mask=mask)


@triton.jit
def _gate_bwd_kernel(
    g_ptr, ysum_ptr, z_ptr, gy_ptr, dz_ptr, out_ptr,
    L, D_CH,
    sg_b, sg_d, sy_b, sy_d, sz_b, sz_d, sz_l, sgy_b, sgy_d, sdz_b, sdz_d,
    BT: tl.constexpr, BD: tl.constexpr,
):
    """Gradients of ``out = ysum silu(z)`` for g = d out: gy = g silu(z), the gradient every branch's scan output
    receives, and dz = g ysum silu'(z), silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))); and ``out`` again, equal
    to ``_gate_fwd_kernel``'s (the output projection's weight gradient reads it; recomputing it costs one store,
    keeping it the layer's size for the whole step). Unit token stride everywhere except z (read through its
    strides); out is laid out as gy."""
    pid_t, pid_d, xb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    xb64 = xb.to(tl.int64)
    n = pid_t * BT + tl.arange(0, BT)
    ch = pid_d * BD + tl.arange(0, BD)
    mask = (ch < D_CH)[:, None] & (n < L)[None, :]
    g = tl.load(g_ptr + xb64 * sg_b + ch[:, None] * sg_d + n[None, :], mask=mask, other=0.0).to(tl.float32)
    ysum = tl.load(ysum_ptr + xb64 * sy_b + ch[:, None] * sy_d + n[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + xb64 * sz_b + ch[:, None] * sz_d + n[None, :].to(tl.int64) * sz_l, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-z))
    gate = z * sig
    at = xb64 * sgy_b + ch[:, None] * sgy_d + n[None, :]
    tl.store(gy_ptr + at, g * gate, mask=mask)
    tl.store(out_ptr + at, ysum * gate, mask=mask)
    tl.store(dz_ptr + xb64 * sdz_b + ch[:, None] * sdz_d + n[None, :], g * ysum * sig * (1.0 + z * (1.0 - sig)), mask=mask)
