"""Pure-PyTorch selective scan (Mamba-1 semantics) in bounded memory.

The recurrence (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023,
Algorithm 2), per batch b, channel d and state n::

    delta_t = softplus(delta_t + delta_bias)                       (when delta_softplus)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = <h_t, C_t> + D * u_t,   then   y_t *= silu(z_t)      (when z is given)

Materialising the (B, D, L, N) state is out of the question for 3D volumes (64^3 tokens x 96 channels x
16 states is 1.6 GB per tensor in fp32), so the sequence is cut into *segments*. The forward pass keeps
only the state entering each segment; the backward pass walks the segments in reverse, recomputes one
segment with autograd and chains the state gradient into the previous one (activation checkpointing by
hand). Inside a segment the scan is itself chunked: short chunks are scanned in parallel from a zero
state, the chunk-end states are carried across chunks sequentially, and each token then receives the
carried state decayed by its within-chunk cumulative decay (exp of a cumulative sum of non-positive
numbers, so nothing overflows). The same three-pass structure is what a GPU kernel uses; here it keeps
Python loops short (chunk length + chunks per segment) while every tensor op is vectorised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_SEGMENT = 4096
DEFAULT_CHUNK = 64


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (channels={d}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, n, length):
            raise ValueError(f"{name} must be (batch, d_state, length) = {(b, n, length)}, got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be (channels={d},), got {tuple(t.shape)}")


def _scan_segment(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, h0, chunk: int):
    """Scan one segment from state ``h0``; returns (y, h_end). All tensors already in compute dtype."""
    b, d, length = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    pad = (-length) % chunk
    if pad:  # delta = 0 leaves the state untouched (decay 1, input 0), so padding is inert
        delta_p, u_p = F.pad(delta, (0, pad)), F.pad(u, (0, pad))
        B_p, C_p = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    else:
        delta_p, u_p, B_p, C_p = delta, u, B, C
    nc = (length + pad) // chunk
    # (b, d, nc, chunk, n)
    log_decay = delta_p.view(b, d, nc, chunk, 1) * A.view(1, d, 1, 1, n)
    drive = (delta_p * u_p).view(b, d, nc, chunk, 1) * B_p.view(b, 1, n, nc, chunk).permute(0, 1, 3, 4, 2)
    decay = torch.exp(log_decay)

    # 1) every chunk scanned in parallel from a zero state
    # (unbind, not indexing: the backward of x[..., t] would allocate a zero tensor of x's full size per step)
    h = torch.zeros(b, d, nc, n, dtype=u.dtype, device=u.device)
    local = []
    for decay_t, drive_t in zip(decay.unbind(3), drive.unbind(3)):
        h = decay_t * h + drive_t
        local.append(h)
    local_states = torch.stack(local, dim=3)  # (b, d, nc, chunk, n)

    # 2) carry the state across chunk boundaries
    cum_log_decay = torch.cumsum(log_decay, dim=3)
    chunk_decay = torch.exp(cum_log_decay[:, :, :, -1])  # (b, d, nc, n)
    carried = [h0]
    for decay_c, end_c in zip(chunk_decay.unbind(2), local[-1].unbind(2)):
        carried.append(decay_c * carried[-1] + end_c)
    h_end = carried[-1]
    h_in = torch.stack(carried[:-1], dim=2)  # state entering each chunk: (b, d, nc, n)

    # 3) outputs: local state + carried state decayed to each position
    states = local_states + torch.exp(cum_log_decay) * h_in.unsqueeze(3)
    C_chunks = C_p.view(b, 1, n, nc, chunk).permute(0, 1, 3, 4, 2)
    y = (states * C_chunks).sum(-1).reshape(b, d, nc * chunk)[:, :, :length]
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h_end


class SelectiveScanFn(torch.autograd.Function):
    """Selective scan with segment-wise recomputation in backward.

    fvcore traces this as ``prim::PythonOp.SelectiveScanFn``; :mod:`segresmamba.profiling` registers
    its cost there.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, segment, chunk):
        in_dtype = u.dtype
        cdt = torch.float64 if in_dtype == torch.float64 else torch.float32
        args = [t if t is None else t.to(cdt) for t in (u, delta, A, B, C, D, z, delta_bias)]
        u_, delta_, A_, B_, C_, D_, z_, bias_ = args
        b, d, length = u.shape
        h = torch.zeros(b, d, A.shape[1], dtype=cdt, device=u.device)
        starts = list(range(0, length, segment))
        seg_states, ys = [], []
        for s in starts:
            sl = slice(s, s + segment)
            seg_states.append(h)
            y, h = _scan_segment(
                u_[..., sl], delta_[..., sl], A_, B_[..., sl], C_[..., sl], D_,
                None if z_ is None else z_[..., sl], bias_, delta_softplus, h, chunk,
            )
            ys.append(y)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(seg_states))
        ctx.meta = (delta_softplus, segment, chunk, starts, cdt, [t is not None for t in (D, z, delta_bias)])
        return torch.cat(ys, dim=-1).to(in_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, D, z, delta_bias, seg_states = ctx.saved_tensors
        delta_softplus, segment, chunk, starts, cdt, _ = ctx.meta
        grad_y = grad_y.to(cdt)
        shared = [t if t is None else t.detach().to(cdt).requires_grad_() for t in (A, D, delta_bias)]
        A_, D_, bias_ = shared
        grads_shared = [None if t is None else torch.zeros_like(t) for t in shared]
        per_token = {k: torch.zeros(t.shape, dtype=cdt, device=t.device) for k, t in (("u", u), ("delta", delta), ("B", B), ("C", C))}
        if z is not None:
            per_token["z"] = torch.zeros(z.shape, dtype=cdt, device=z.device)
        grad_h = torch.zeros_like(seg_states[0])
        for i in reversed(range(len(starts))):
            sl = slice(starts[i], starts[i] + segment)
            with torch.enable_grad():
                local = {
                    "u": u[..., sl], "delta": delta[..., sl], "B": B[..., sl], "C": C[..., sl],
                    **({"z": z[..., sl]} if z is not None else {}),
                }
                local = {k: v.detach().to(cdt).requires_grad_() for k, v in local.items()}
                h0 = seg_states[i].detach().requires_grad_()
                y, h_end = _scan_segment(
                    local["u"], local["delta"], A_, local["B"], local["C"], D_, local.get("z"), bias_,
                    delta_softplus, h0, chunk,
                )
                wrt = list(local.values()) + [h0] + [t for t in shared if t is not None]
                grads = torch.autograd.grad((y, h_end), wrt, (grad_y[..., sl], grad_h), allow_unused=True)
            for k, g in zip(local, grads):
                if g is not None:
                    per_token[k][..., sl] = g
            grad_h = grads[len(local)]
            rest = iter(grads[len(local) + 1 :])
            for j, t in enumerate(shared):
                if t is not None:
                    g = next(rest)
                    if g is not None:
                        grads_shared[j] += g

        def cast(g, ref):
            return None if (g is None or ref is None) else g.to(ref.dtype)

        return (
            cast(per_token["u"], u), cast(per_token["delta"], delta), cast(grads_shared[0], A),
            cast(per_token["B"], B), cast(per_token["C"], C), cast(grads_shared[1], D),
            cast(per_token.get("z"), z), cast(grads_shared[2], delta_bias), None, None, None,
        )


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    segment: int = DEFAULT_SEGMENT,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Selective scan, differentiable, memory bounded by one segment.

    Args:
        u: input (batch, channels, length).
        delta: step sizes before ``delta_bias``/softplus, same shape as ``u``.
        A: state matrix (channels, d_state), real (negative for a stable decay).
        B, C: input and output projections (batch, d_state, length).
        D: skip weights (channels,), optional.
        z: gate (batch, channels, length); the output is multiplied by ``silu(z)``; optional.
        delta_bias: added to ``delta`` before the softplus (channels,), optional.
        delta_softplus: apply softplus to ``delta``.
        segment: tokens recomputed together in backward; bounds activation memory to about
            ``6 * batch * channels * segment * d_state`` floats.
        chunk: tokens scanned sequentially inside a segment before the cross-chunk carry.

    Returns:
        y of ``u``'s shape and dtype; state arithmetic runs in fp32 (fp64 for fp64 inputs).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if segment < 1 or chunk < 1:
        raise ValueError(f"segment and chunk must be >= 1, got {segment} and {chunk}")
    chunk = min(chunk, segment)
    if segment % chunk:
        raise ValueError(f"segment ({segment}) must be a multiple of chunk ({chunk})")
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, segment, chunk)
