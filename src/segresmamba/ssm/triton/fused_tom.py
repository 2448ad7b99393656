"""The ToM layer's branch work on the GPU without permuted copies of its (channels x tokens) activations.

:class:`segresmamba.ssm.tom.TriOrientedMamba` computes, per orientation o (forward, reverse, inter-slice),
``unorient(scan(silu(conv_o(orient(x)))), o)``. Here the activations stay in the natural (D, H, W) token
order and the orientations are index arithmetic inside the kernels (only the scan's small B and C, d_state
channels, are copied into each branch's order by :func:`segresmamba.ssm.triton.autograd.scan_forward`):

- :func:`conv_silu_forward`: the causal depthwise conv of every branch along its own scan order, with
  the SiLU fused, reading the in_proj output in place (any strides) and writing ``(R, b, d, L)``;
- the x / dt projections are per token, so they run on the natural order as batched matmuls;
- :func:`segresmamba.ssm.triton.autograd.scan_forward`: all branches' scans in one launch per pass, without the
  gate: the branches share z, so :func:`gate_forward` gates their sum once (``sum_o y_o silu(z) = silu(z) sum_o
  y_o``). The scans then neither read z nor write a dz per branch, and the backward's dz is one (b, d, L) tensor.

:class:`TriOrientedMixFn` runs these steps, with the layer's input and output projections around them, as a single
autograd node with a hand-written backward.

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
from torch._utils import _flatten_dense_tensors

from segresmamba.ssm.orientations import orientation_codes
from segresmamba.ssm.scan import timing_kernels_now
from segresmamba.ssm.triton.autograd import ScanSaved, branch_rows, capturing, codes_on, last_dim_unit, scan_backward, scan_forward, sum_partials
from segresmamba.ssm.triton.kernels import (
    _conv_bwd_dx_kernel,
    _conv_bwd_pre_kernel,
    _conv_fwd_kernel,
    _gate_bwd_kernel,
    _gate_fwd_kernel,
)
from segresmamba.ssm.triton.tuning import TUNING, autocast_dtype_or, cdiv

BLOCK_T, BLOCK_D = 128, 16


def near_taps(k: int, nslices: int) -> bool:
    """Whether every tap of a width-k conv lies less than one run of slices away in the inter-slice order
    (k <= nslices): the conv kernels then find the taps' addresses without integer division."""
    return k <= nslices


def conv_silu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, codes: tuple[int, ...], nslices: int) -> torch.Tensor:
    """``u[r] = silu(causal depthwise conv of x along branch r's scan order)``, natural token order, no autograd.

    x (b, d, L) any strides; weight (R, d, K) and bias (R, d), contiguous. Returns u (R, b, d, L) in x's dtype."""
    b, d, length = x.shape
    branches, _, k = weight.shape
    code_t = codes_on(x.device, codes)
    u = torch.empty(branches * b, d, length, dtype=x.dtype, device=x.device)
    grid = (cdiv(length, BLOCK_T), cdiv(d, BLOCK_D), branches * b)
    _conv_fwd_kernel[grid](
        x, weight, bias, u, code_t, length, d, b, nslices, length // nslices,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), bias.stride(0), u.stride(0), u.stride(1),
        K=k, BT=BLOCK_T, BD=BLOCK_D, NEAR=near_taps(k, nslices),
    )
    return u.view(branches, b, d, length)


def conv_silu_backward(x, weight, bias, codes, nslices, grad_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`conv_silu_forward` for ``grad_u`` (R, b, d, L): dx (b, d, L) in x's dtype, summed over
    the branches; dweight (R, d, K) and dbias (R, d) in fp32.

    The pre-activation gradient between the two kernels is stored in grad_u's dtype, the precision of the gradient
    it scales (the weight and bias partials are summed from it in fp32, in registers): on 64^3 tokens and three
    branches an fp32 copy would be 288 MiB at the peak of SegResMamba's bf16 step, against 144 MiB."""
    b, d, length = x.shape
    branches, _, k = weight.shape
    grad_u = last_dim_unit(grad_u.reshape(branches * b, d, length))
    code_t = codes_on(x.device, codes)
    nt = cdiv(length, BLOCK_T)
    grid = (nt, cdiv(d, BLOCK_D), branches * b)
    f32 = dict(dtype=torch.float32, device=x.device)
    gp = torch.empty(branches * b, d, length, dtype=grad_u.dtype, device=x.device)
    dw_part = torch.empty(branches * b * nt, d, k, **f32)
    db_part = torch.empty(branches * b * nt, d, **f32)
    _conv_bwd_pre_kernel[grid](
        x, weight, bias, grad_u, gp, dw_part, db_part, code_t, length, d, b, nslices, length // nslices, nt,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), bias.stride(0), grad_u.stride(0), grad_u.stride(1),
        K=k, BT=BLOCK_T, BD=BLOCK_D, NEAR=near_taps(k, nslices),
    )
    # the branches' shares of dx are summed in the kernel's registers: one (b, d, L) tensor in x's dtype
    dx = torch.empty(b, d, length, dtype=x.dtype, device=x.device)
    _conv_bwd_dx_kernel[(nt, grid[1], b)](
        weight, gp, dx, code_t, length, d, b, branches, nslices, length // nslices, weight.stride(0), weight.stride(1),
        K=k, BT=BLOCK_T, BD=BLOCK_D, NEAR=near_taps(k, nslices),
    )
    return dx, sum_partials(dw_part.view(branches, -1, d, k), 1), sum_partials(db_part.view(branches, -1, d), 1)


def gate_forward(y: torch.Tensor, z: torch.Tensor, branches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The branches' outputs summed, then gated once: ``ysum = sum_r y[r]`` and ``out = ysum * silu(z)``, both
    (b, d, L) in y's dtype, no autograd. y (R b, d, L) with unit token stride; z (b, d, L), any strides.

    The branches share z, so gating their sum equals summing their gated outputs (Mamba gates each
    ``selective_scan`` output by ``silu(z)``), with one gate instead of R and the scans run without z."""
    rb, d, length = y.shape
    b = rb // branches
    ysum = torch.empty(b, d, length, dtype=y.dtype, device=y.device)
    out = torch.empty_like(ysum)
    _gate_fwd_kernel[(cdiv(length, BLOCK_T), cdiv(d, BLOCK_D), b)](
        y, z, ysum, out, length, d, b, y.stride(0), y.stride(1), z.stride(0), z.stride(1), z.stride(2),
        out.stride(0), out.stride(1), R=branches, BT=BLOCK_T, BD=BLOCK_D,
    )
    return ysum, out


def gate_backward(grad_out: torch.Tensor, ysum: torch.Tensor, z: torch.Tensor, grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`gate_forward`'s ``out`` for ``grad_out`` (b, d, L): the gradient of ysum, which every
    branch's output receives (in ``grad_dtype``), and dz (in z's dtype); and ``out`` itself, recomputed equal to
    :func:`gate_forward`'s, so that the layer need not keep it for its output projection's weight gradient.
    grad_out and ysum with unit token stride; z any strides."""
    grad_out = last_dim_unit(grad_out)
    b, d, length = ysum.shape
    gy = torch.empty(b, d, length, dtype=grad_dtype, device=ysum.device)
    dz = torch.empty(b, d, length, dtype=z.dtype, device=ysum.device)
    out = torch.empty_like(ysum, memory_format=torch.contiguous_format)
    _gate_bwd_kernel[(cdiv(length, BLOCK_T), cdiv(d, BLOCK_D), b)](
        grad_out, ysum, z, gy, dz, out, length, d, grad_out.stride(0), grad_out.stride(1), ysum.stride(0), ysum.stride(1),
        z.stride(0), z.stride(1), z.stride(2), gy.stride(0), gy.stride(1), dz.stride(0), dz.stride(1),
        BT=BLOCK_T, BD=BLOCK_D,
    )
    return gy, dz, out


class OrientedConvSiluFn(torch.autograd.Function):
    """:func:`conv_silu_forward` with its gradients (the conv alone; the ToM layer runs it inside
    :class:`TriOrientedMixFn`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, codes, nslices):
        weight, bias = weight.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, weight, bias)
        ctx.layout = (codes, nslices)
        return conv_silu_forward(x, weight, bias, codes, nslices)

    @staticmethod
    def backward(ctx, grad_u):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = conv_silu_backward(x, weight, bias, *ctx.layout, grad_u)
        return dx, dw.to(weight.dtype), db.to(bias.dtype), None, None


SPLIT_K_PIECE = 4096  # tokens per partial product of a weight gradient


def _token_pieces(t: torch.Tensor, ri: int, bi: int, k: int, piece: int) -> torch.Tensor:
    """(k, rows, piece) view of ``t[ri, bi, :, :k * piece]``: its first k pieces of the token axis, in place."""
    s = t.stride()
    return t.as_strided((k, t.shape[2], piece), (piece * s[3], s[2], s[3]), t.storage_offset() + ri * s[0] + bi * s[1])


def _weight_grad(g: torch.Tensor, x: torch.Tensor, piece: int | None = None) -> torch.Tensor:
    """``sum_{b, l} g[r, b, o, l] x[r, b, i, l]`` -> (R, O, I) in fp32, as partial products over pieces of
    the token axis summed afterwards. One GEMM with K = L (262,144 tokens at 64^3) and a 96 x 3 output
    (the delta projection) gets a handful of thread blocks from cuBLAS; pieces give it R b L / piece.

    Each (r, b) slab's pieces are one strided batch of GEMMs read in place (batch stride = the piece, the
    rows one token axis apart), whatever the token axis's stride. Batching the (r, b, piece) axes
    together instead would make ``matmul`` copy both operands first: the pieces' stride cannot merge with
    the slabs' strides."""
    piece = piece or SPLIT_K_PIECE
    r, b, o, length = g.shape
    i = x.shape[2]
    full = length - length % piece
    out = None
    if full:
        k = full // piece
        # bmm's out= is outside autocast: cast the operands as autocast casts matmul's, for a caller that runs the
        # backward under autocast (training and scan.measure_fastest do not), and bring mixed dtypes to one
        dtype = autocast_dtype_or(g.device.type, torch.promote_types(g.dtype, x.dtype))
        g, x = g.to(dtype), x.to(dtype)
        partial = g.new_empty(r, b, k, o, i)
        slabs = partial.view(r * b, k, o, i)
        for ri in range(r):
            for bi in range(b):
                # direct strided views: this runs in every ToM layer's backward, and each view is host time
                torch.bmm(_token_pieces(g, ri, bi, k, piece), _token_pieces(x, ri, bi, k, piece).transpose(1, 2), out=slabs[ri * b + bi])
        out = partial.sum((1, 2), dtype=torch.float32)
    if full < length:
        rest = torch.matmul(g[..., full:], x[..., full:].transpose(-1, -2)).sum(1, dtype=torch.float32)
        out = rest if out is None else out + rest
    return out


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


# each kind of branch parameter and where a branch holds it; the order is that of the node's inputs and gradients
_PARAMETER_OF = {
    "conv_weight": lambda br: br.conv1d.weight,
    "conv_bias": lambda br: br.conv1d.bias,
    "x_proj": lambda br: br.x_proj.weight,
    "dt_weight": lambda br: br.dt_proj.weight,
    "dt_bias": lambda br: br.dt_proj.bias,
    "A_log": lambda br: br.A_log,
    "D": lambda br: br.D,
}
PARAMETER_KINDS = tuple(_PARAMETER_OF)


def branch_parameters(branches) -> list[torch.Tensor]:
    """The ToM branches' parameters, kind by kind (:data:`PARAMETER_KINDS`), branches in order within a kind."""
    return [get(br) for get in _PARAMETER_OF.values() for br in branches]


def stack_branch_parameters(params, branches: int) -> dict[str, torch.Tensor]:
    """Each kind of :func:`branch_parameters` stacked along a new first axis (R, ...), from a single concatenation
    (one copy for the seven kinds; the stacks are views of it). The conv taps come out (R, d, K). Parameters of
    mixed dtypes are stacked kind by kind, each stack in its kind's promoted dtype."""
    groups = [params[i:i + branches] for i in range(0, len(params), branches)]
    if len({p.dtype for p in params}) > 1:
        stacked = [torch.stack(group) for group in groups]
    else:
        flat = _flatten_dense_tensors(params)  # one concatenation, its views made in C++ rather than one Python call each
        stacked, offset = [], 0
        for group in groups:
            size = branches * group[0].numel()
            stacked.append(flat[offset:offset + size].view(branches, *group[0].shape))
            offset += size
    out = dict(zip(PARAMETER_KINDS, stacked))
    out["conv_weight"] = out["conv_weight"].flatten(1, 2)  # (R, d, 1, K) -> (R, d, K)
    return out


def _as_parameter(grad: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``grad`` in its parameter's shape and dtype; a view or a cast only where one is needed (each costs the host a
    dispatcher call, and a ToM layer returns 21 such gradients per step)."""
    if grad.shape != shape:
        grad = grad.view(shape)
    return grad if grad.dtype == dtype else grad.to(dtype)


# a branch's (b, d, L) elements from which the fused layer's backward runs its branches one at a time: SegResMamba's
# first ToM layer on BraTS patches (96 channels x 64^3 tokens, 25 M) is above, its 32^3 layers (6.3 M) below
PER_BRANCH_BACKWARD_ELEMENTS = 1 << 24


def one_branch_at_a_time(branches: int, elements: int, device: torch.device) -> bool:
    """Whether the backward runs the branches one at a time: for a layer whose branch tensors have at least
    :data:`PER_BRANCH_BACKWARD_ELEMENTS` elements, in work that CUDA graphs will replay (their warm-up and capture,
    :func:`segresmamba.ssm.scan.timing_kernels`, or any capture). There the tensors alive at once set the size of the
    graphs' memory pool for the whole run, and a replay's extra launches cost nothing; an eager step pays each launch
    on the host, and its memory is given back after the step. The warm-up runs the same path as the capture, so
    that the kernels it needs are compiled, and its small constants made, before the capture starts."""
    return (branches > 1 and elements >= PER_BRANCH_BACKWARD_ELEMENTS and device.type == "cuda"
            and (timing_kernels_now() or capturing(device)))


GEMM_ALIGN = 8  # elements: cuBLAS runs its fast (vectorised) GEMM kernels on leading dimensions divisible by 8 (16 bytes)


def aligned_dt_weight(w_dt: torch.Tensor, d_state: int) -> torch.Tensor:
    """The dt projection's weights (R, d, rank) with zero columns appended up to a multiple of :data:`GEMM_ALIGN`
    (at most rank + 2 d_state), to be multiplied with as many leading rows of x_dbl (the rank's, then B's first).

    ``delta = W_dt dt`` and its two gradient products have a leading dimension of rank = ceil(C / 16) (3 for the
    48-channel layers): cuBLAS then runs unvectorised kernels, about 80 µs for each such product of a 64^3 layer on
    an H200 (results/perf/step_profile_*.md). With the padding the products read and write aligned memory; the
    padded columns are zero, so B's rows add exact zeros to delta (B finite), and the backward drops the padding's
    rows and columns of the gradients."""
    rank = w_dt.shape[-1]
    padded = min(-(-rank // GEMM_ALIGN) * GEMM_ALIGN, rank + 2 * d_state)
    return w_dt if padded == rank else torch.nn.functional.pad(w_dt, (0, padded - rank))


def _branch_group_backward(scan: ScanSaved, group: slice, b: int, grad_ysum: torch.Tensor, x: torch.Tensor,
                           x_dbl: torch.Tensor, conv_w, conv_b, w_x, w_dt, scan_rest: list, dt_rank: int) -> tuple:
    """The backward of the branches ``group`` of :class:`TriOrientedMixFn`, from the gradient every branch's scan
    output receives (``grad_ysum``, (b, d, L)) down to x: their u and delta recomputed (the forward keeps neither),
    their scans' backward, the x and dt projections', and their conv's. Returns dx (b, d, L; these branches' share)
    and these branches' parameter gradients by kind, each (branches in the group, ...)."""
    codes, nb, nslices = scan.layout
    whole = group.stop - group.start == len(codes)

    def take(t, part=group):  # these branches' part of a per-branch tensor (the tensor itself for all: a view less)
        return t if whole or t is None else t[part]

    codes = codes[group]
    branches = len(codes)
    rows = slice(group.start * b, group.stop * b)
    _, d, length = grad_ysum.shape
    rb = branches * b
    A, B, C, D, z, delta_bias, entering = scan_rest
    # every branch receives the sum's gradient: a stride-0 broadcast over the branches where b == 1
    grad_y = grad_ysum.unsqueeze(0).expand(branches, b, d, length).reshape(rb, d, length)
    conv_w, conv_b, w_x, w_dt, x_dbl, A = take(conv_w), take(conv_b), take(w_x), take(w_dt), take(x_dbl), take(A)
    u = conv_silu_forward(x, conv_w, conv_b, codes, nslices)  # (R, b, d, L)
    dt = x_dbl[:, :, :w_dt.shape[-1]]  # the rank's rows and the padding's (see aligned_dt_weight)
    delta = torch.matmul(w_dt.unsqueeze(1), dt)
    tensors = (branch_rows(u), branch_rows(delta), A, take(B, rows), take(C, rows), take(D), z, take(delta_bias), take(entering, rows))
    du, ddelta, dA, dB, dC, dD, _, dbias = scan_backward(scan._replace(tensors=tensors, layout=(codes, nb, nslices)), grad_y)
    # each tensor is dropped where it is last read: under CUDA graphs the tensors alive at once set the size of the
    # graphs' memory pool
    del grad_y, delta, tensors

    def four(t):  # (R b, c, L) -> (R, b, c, L)
        return t.view(branches, b, *t.shape[1:])

    # the padding's rows and columns of these two products are dropped: zero, and B's gradient's share
    d_dt = torch.matmul(w_dt.transpose(1, 2).unsqueeze(1), four(ddelta))[:, :, :dt_rank]  # (R, b, rank, L)
    dw_dt = _weight_grad(four(ddelta), dt)[..., :dt_rank].contiguous()
    del ddelta
    d_xdbl = torch.cat([d_dt, four(dB), four(dC)], dim=2)  # (R, b, rank + 2N, L)
    del d_dt, dB, dC
    # du += W_x^T d_xdbl, accumulated by the GEMM itself (beta = 1): no product of du's size beside it
    w_x_t = w_x.transpose(1, 2).unsqueeze(1).expand(branches, b, d, w_x.shape[1]).reshape(rb, d, -1)
    du.baddbmm_(w_x_t, d_xdbl.view(rb, -1, length))
    dw_x = _weight_grad(d_xdbl, u)
    del d_xdbl, u
    dx, dconv_w, dconv_b = conv_silu_backward(x, conv_w, conv_b, codes, nslices, four(du))
    return dx, {"conv_weight": dconv_w, "conv_bias": dconv_b, "x_proj": dw_x, "dt_weight": dw_dt, "dt_bias": dbias,
                "A_log": dA * A, "D": dD}  # dA_log = dA * A, A = -exp(A_log)


class TriOrientedMixFn(torch.autograd.Function):
    """The ToM layer between its LayerNorm and its residual sum as one autograd node: the input projection, per
    branch r the causal conv along its scan order with SiLU, the x and dt projections, the selective scan, the sum
    over the branches, and the output projection.

    Forward (tokens (b, L, C) in, natural order): ``[x, z] = tokens W_in^T`` (x and z (b, d, L) views of it),
    ``u_r = silu(conv_r(x))``, ``[dt_r, B_r, C_r] = W_x,r u_r``, ``delta_r = W_dt,r dt_r``,
    ``y = silu(z) sum_r scan_r(u_r, delta_r, -exp(A_log,r), B_r, C_r, D_r, dt_bias_r)`` (:func:`gate_forward`; the
    same as summing each branch's z-gated scan), ``out = W_out y`` (b, C, L), laid
    out in memory as the layer's map (``layout``'s last entry: channels-last, the tokens' (b, L, C)). The backward
    applies the chain rule through the same steps by hand (the scan's and conv's kernels, two matmuls per
    projection). One node instead of the few dozen small ones of the op-by-op graph, the projections' autocast casts
    and autograd nodes included: a ToM layer's eager step is bound by the host's time per op
    (results/perf/scan_notes.md), and each node and view costs it.

    Autocast is off inside; ``compute_dtype`` (the autocast dtype where autocast is on, else the tokens') is what
    the projections and activations run in, as autocast would run them: the weights are cast to it, A, D and the
    delta bias are used in fp32, and the branch sum and its gate are taken in fp32 and stored in it. Parameter
    gradients come back in the parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, tokens, layout, compute_dtype, w_in, w_out, *params):
        codes, nslices, dt_rank, d_state, chunk, channels_last = layout
        branches = len(codes)
        b, length, _ = tokens.shape
        with torch._C._DisableAutocast():  # every device's autocast, as torch.autocast(enabled=False) at a third of its host cost
            tokens_c = tokens.to(compute_dtype)
            w_in_c, w_out_c = w_in.to(compute_dtype), w_out.to(compute_dtype)
            xz = torch.matmul(tokens_c, w_in_c.t())  # (b, L, 2 d), as the input projection writes it
            d = xz.shape[-1] // 2
            x = xz[..., :d].transpose(1, 2)  # (b, d, L) views into xz: the kernels read them in place
            z = xz[..., d:].transpose(1, 2)
            p = stack_branch_parameters(params, branches)
            conv_w, conv_b = p["conv_weight"], p["conv_bias"]
            u = conv_silu_forward(x, conv_w, conv_b, codes, nslices)  # (R, b, d, L)
            # weights on the left keep tokens last: dt, B, C and delta come out (R, b, ., L) with unit token
            # stride, as the scan reads them, so no transposed copy is made
            w_x, w_dt = p["x_proj"].to(u.dtype), aligned_dt_weight(p["dt_weight"].to(u.dtype), d_state)
            x_dbl = torch.matmul(w_x.unsqueeze(1), u)  # (R, b, rank + 2N, L)
            delta = torch.matmul(w_dt.unsqueeze(1), x_dbl[:, :, :w_dt.shape[-1]])  # (R, b, d, L)
            A = torch.exp(p["A_log"].float()).neg_()

            B, C = x_dbl[:, :, dt_rank:dt_rank + d_state], x_dbl[:, :, dt_rank + d_state:]
            # the scans run ungated; their sum is gated once (gate_forward)
            y, scan_saved = scan_forward(
                branch_rows(u), branch_rows(delta), A, branch_rows(B), branch_rows(C), p["D"].float(), None, p["dt_bias"].float(), True,
                codes, b, nslices, chunk,
            )
            ysum, summed = gate_forward(y, z, branches)
            del y
            # the output in the map's layout, so that the residual sum reads both operands alike
            out = torch.matmul(summed.transpose(1, 2), w_out_c.t()).transpose(1, 2) if channels_last else torch.matmul(w_out_c, summed)
        # u, delta and the gated sum are not kept: the backward recomputes them from xz and x_dbl (the conv kernel, one
        # small GEMM, and the gate's backward kernel), the same values bit for bit. Kept, they were 7 of the 10 (b, d, L)
        # tensors' worth (u and delta one per branch) that the layer held between its forward and its backward
        _, _, *scan_rest = scan_saved.tensors
        ctx.save_for_backward(tokens_c, w_in_c, w_out_c, xz, ysum, conv_w, conv_b, w_x, w_dt, x_dbl, *scan_rest)
        ctx.scan = scan_saved._replace(tensors=None)
        ctx.layout = layout
        ctx.dtypes = (tokens.dtype, w_in.dtype, w_out.dtype)
        ctx.param_shapes = [(p.shape, p.dtype) for p in params]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        tokens_c, w_in_c, w_out_c, xz, ysum, conv_w, conv_b, w_x, w_dt, x_dbl, *scan_rest = ctx.saved_tensors
        codes, nslices, dt_rank, _, _, _ = ctx.layout
        tokens_dtype, w_in_dtype, w_out_dtype = ctx.dtypes
        branches = len(codes)
        b, length, d2 = xz.shape
        d = d2 // 2
        x, z = xz[..., :d].transpose(1, 2), xz[..., d:].transpose(1, 2)
        grad_out = grad_out.to(w_out_c.dtype)
        grad_summed = torch.matmul(w_out_c.t(), grad_out)  # (b, d, L), whatever grad_out's layout
        grad_ysum, dz, summed = gate_backward(grad_summed, ysum, z, xz.dtype)
        del grad_summed
        dw_out = _weight_grad(grad_out.unsqueeze(0), summed.unsqueeze(0))[0]  # (C, d), fp32
        del summed
        # the branches one at a time (the backward's temporaries are then one branch's, a third of them) or together
        groups = ([slice(r, r + 1) for r in range(branches)] if one_branch_at_a_time(branches, b * d * length, xz.device)
                  else [slice(0, branches)])
        dx, parts = None, []
        for group in groups:
            dx_part, grads = _branch_group_backward(ctx.scan, group, b, grad_ysum, x, x_dbl, conv_w, conv_b, w_x, w_dt, scan_rest, dt_rank)
            dx = dx_part if dx is None else dx.add_(dx_part)
            parts.append(grads)
            del dx_part
        del grad_ysum
        by_kind = {kind: parts[0][kind] if len(parts) == 1 else torch.cat([g[kind] for g in parts]) for kind in parts[0]}
        dxz_t = torch.cat([dx, dz], dim=1)  # (b, 2 d, L): the gradient of xz, transposed
        del dx, dz
        d_tokens = torch.matmul(dxz_t.transpose(1, 2), w_in_c) if ctx.needs_input_grad[0] else None  # (b, L, C)
        dw_in = _weight_grad(dxz_t.unsqueeze(0), tokens_c.transpose(1, 2).unsqueeze(0))[0]  # (2 d, C), fp32
        grads = [g for kind in PARAMETER_KINDS for g in by_kind[kind].unbind(0)]
        params = [
            None if not needed else _as_parameter(g, shape, dtype)
            for g, (shape, dtype), needed in zip(grads, ctx.param_shapes, ctx.needs_input_grad[5:])
        ]
        return (None if d_tokens is None else d_tokens.to(tokens_dtype), None, None,
                dw_in.to(w_in_dtype) if ctx.needs_input_grad[3] else None,
                dw_out.to(w_out_dtype) if ctx.needs_input_grad[4] else None, *params)


def tri_oriented_mix(tokens: torch.Tensor, in_proj: torch.nn.Linear, out_proj: torch.nn.Linear, branches,
                     orientations: tuple[str, ...], nslices: int, channels_last: bool = False) -> torch.Tensor:
    """out_proj of the sum over the branches of their outputs, natural order: the fused equivalent of ToM's
    ``out_proj(sum_o branch_o(in_proj(tokens)))``.

    Args:
        tokens: (b, L, C), the normalised tokens.
        in_proj, out_proj: the layer's bias-free projections (C -> 2 d_inner, d_inner -> C).
        branches: the :class:`segresmamba.ssm.tom.SelectiveSSMBranch` modules, in ``orientations`` order.
        channels_last: lay the output out in memory as (b, L, C) (a channels-last map's), else as (b, C, L).

    Returns:
        (b, C, L), in the autocast dtype of the tokens' device where autocast is on, else in the tokens' dtype.
    """
    if tokens.shape[1] % nslices:
        raise ValueError(f"sequence length {tokens.shape[1]} is not divisible by nslices={nslices}")
    compute_dtype = autocast_dtype_or(tokens.device.type, tokens.dtype)
    first = branches[0]
    layout = (orientation_codes(orientations), nslices, first.dt_rank, first.d_state, TUNING["chunk"], channels_last)
    return TriOrientedMixFn.apply(tokens, layout, compute_dtype, in_proj.weight, out_proj.weight, *branch_parameters(branches))


__all__ = ["PARAMETER_KINDS", "TriOrientedMixFn", "branch_parameters", "conv_silu_backward", "conv_silu_forward",
           "gate_backward", "gate_forward", "oriented_conv_silu", "stack_branch_parameters", "tri_oriented_mix"]
