"""The chunked selective scan in plain PyTorch: the specification the Triton kernels follow, and their oracle.

The recurrence is the one of :mod:`segresmamba.ssm.scan_torch` (Gu & Dao, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", 2023), per batch b, channel d and state n::

    dt_t = softplus(delta_t + delta_bias)   a_t = exp(dt_t * A)   x_t = dt_t * B_t * u_t
    h_t  = a_t * h_{t-1} + x_t              y_t = (<h_t, C_t> + D * u_t) * silu(z_t)

``h_t = a_t h_{t-1} + x_t`` is a first-order linear recurrence, so the pairs (a, x) compose under the
associative operator ``(a1, x1) . (a2, x2) = (a1 a2, a2 x1 + x2)`` and can be scanned in parallel
(Blelloch, "Prefix Sums and Their Applications", 1990; Martin & Cundy, "Parallelizing Linear Recurrent
Neural Nets Over Sequence Length", ICLR 2018). The mamba_ssm CUDA kernel walks the whole sequence with
one thread block per (batch, channel) row; at batch 1 and ~100 channels that leaves most of an H100
idle. The Triton scan also cuts the sequence into chunks of ``chunk`` tokens (the chunked scan of
Blelloch's section 1.4: local scans, a scan of the chunk totals, then a local pass that adds the carry-in):

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
    3. every chunk recomputes its states from the saved entering state, scans dh backwards from the
       carried-in gradient, and writes du, ddelta, dz, dB, dC, dA, dD and ddelta_bias.

Only the chunk-entering states are saved for backward, never anything of size L x N.
``a_t h_{t-1}``, needed for dA and ddelta, is taken as ``h_t - x_t`` rather than by dividing by a
(which underflows to 0 for long steps).

:func:`chunked_scan_reference` and :func:`chunked_scan_reference_backward` spell out these three passes
with the kernels' explicit formulas (float64-capable, no autograd), so the algorithm and every gradient
formula are checked on a CPU where Triton is absent. The kernels are in :mod:`segresmamba.ssm.triton.kernels`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


__all__ = ["chunked_scan_reference", "chunked_scan_reference_backward"]
