"""Tri-oriented Mamba (ToM): ToM(z) = Mamba(z_f) + Mamba(z_r) + Mamba(z_s).

Xing et al., "SegMamba: Long-range Sequential Modeling Mamba For 3D Medical Image Segmentation",
MICCAI 2024 (the tri-oriented layer); Das et al., "SegResMamba", MIDL 2025 (its use inside CMMB blocks).
The layer follows SegMamba's "v3" Mamba: one shared input projection, three selective-scan branches
(forward, reverse, inter-slice) each with its own causal depthwise conv, x/dt projections, A and D,
summed before one shared output projection. The tri-orientation lives here, outside the scan kernel, so
any scan backend serves it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segresmamba.ssm import scan as scan_mod
from segresmamba.ssm.orientations import ORIENTATIONS, orient, unorient
from segresmamba.ssm.scan import check_scan_backend, selective_scan
from segresmamba.ssm.triton import fused_available
from segresmamba.ssm.weight_decay import exclude_from_weight_decay


class SelectiveSSMBranch(nn.Module):
    """The per-direction part of a Mamba block: causal depthwise conv, x/dt projections, A, D, scan.

    Initialisation follows Mamba (Gu & Dao 2023): A = -[1..d_state] per channel, dt bias = inverse
    softplus of dt drawn log-uniformly in [dt_min, dt_max], D = 1; A_log and D train without weight
    decay when the optimiser is built from :func:`segresmamba.ssm.param_groups`.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int = 1,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        dt_init_std = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        exclude_from_weight_decay(self.A_log, self.D)  # Mamba's convention: see segresmamba.ssm.weight_decay

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickling rebuild Parameters without their attributes: mark A_log and D again
        super().__setstate__(state)
        exclude_from_weight_decay(self.A_log, self.D)

    def forward(self, x: torch.Tensor, z: torch.Tensor, scan_backend: str) -> torch.Tensor:
        """x, z: (B, d_inner, L) in this branch's scan order -> y (B, d_inner, L)."""
        length = x.shape[-1]
        x = F.silu(self.conv1d(x)[..., :length])
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # bias goes in as delta_bias
        A = -torch.exp(self.A_log.float())
        return selective_scan(
            x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=scan_backend,
        )


def _channels_last(x: torch.Tensor) -> bool:
    """A 5-D map in channels_last_3d memory that is not also plain contiguous."""
    return x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


class TriOrientedMamba(nn.Module):
    """ToM layer on a 3D feature map (B, C, D, H, W) -> (B, C, D, H, W).

    ``out = [x +] out_proj(sum_o unorient_o(branch_o(orient_o(in_proj(LN(x))))))`` over the
    orientations forward, reverse and inter-slice.

    Args:
        dim: channels C of the feature map.
        d_state: SSM state size N (Mamba default 16).
        d_conv: causal depthwise conv width (4).
        expand: inner width factor; d_inner = expand * dim (2).
        dt_rank: rank of the delta projection; ``None`` gives ceil(dim / 16) as in Mamba.
        nslices: number of chunks of the inter-slice interleave. ``None`` (default) uses the depth D of
            the input, i.e. a true depth-first scan, matching SegMamba's 64/32/16/8 at 128^3 input;
            ``4`` reproduces SegResMamba's released setting. The token count must be divisible by it.
        residual: return ``x + ToM(x)`` (pre-norm residual, as in SegMamba's current code) instead of
            ``ToM(x)``. The SegResMamba paper is silent; its vendored layer has no residual. Default True
            for stability; the choice is an ablation setting.
        orientations: which branches to build, a subset of :data:`~segresmamba.ssm.orientations.ORIENTATIONS`.
        scan_backend: "auto", "torch", "mamba_ssm" or another registered backend
            (see :mod:`segresmamba.ssm.scan`).
        fused: with ``scan_backend="triton"`` on a GPU, run the branches through
            :mod:`segresmamba.ssm.triton.fused_tom` (each branch's conv and scan in its own token order by index
            arithmetic, all branches' scans in one launch, no permuted copies of the (channels x tokens)
            activations; the LayerNorm reads the map in place, :mod:`segresmamba.ssm.triton.token_norm`); with
            ``"auto"``, the first call of each input signature times the fused path against the per-branch one
            (whose scans ``auto`` picks) and keeps the faster. ``False`` keeps the per-branch path with
            orient/unorient copies. Same parameters, same result.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        nslices: int | None = None,
        residual: bool = True,
        orientations: tuple[str, ...] = ORIENTATIONS,
        scan_backend: str = "auto",
        fused: bool = True,
    ) -> None:
        super().__init__()
        if dim < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(f"dim, d_state, d_conv and expand must be >= 1, got {dim}, {d_state}, {d_conv}, {expand}")
        if nslices is not None and nslices < 1:
            raise ValueError(f"nslices must be None (depth-first) or >= 1, got {nslices}")
        if not orientations or any(o not in ORIENTATIONS for o in orientations) or len(set(orientations)) != len(orientations):
            raise ValueError(f"orientations must be distinct names from {ORIENTATIONS}, got {orientations}")
        check_scan_backend(scan_backend)
        self.dim, self.nslices, self.residual = dim, nslices, residual
        self.orientations = tuple(orientations)
        self.scan_backend = scan_backend
        self.fused = fused
        d_inner = expand * dim
        self.d_inner = d_inner
        dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.branches = nn.ModuleDict(
            {f"{o}_scan": SelectiveSSMBranch(d_inner, d_state=d_state, d_conv=d_conv, dt_rank=dt_rank) for o in self.orientations}
        )
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, nslices={self.nslices or 'depth'}, residual={self.residual}, "
                f"scan_backend={self.scan_backend!r}, fused={self.fused}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.dim:
            raise ValueError(f"TriOrientedMamba(dim={self.dim}) expects (B, {self.dim}, D, H, W), got {tuple(x.shape)}")
        b, c, depth, h, w = x.shape
        nslices = depth if self.nslices is None else self.nslices
        out = self._mix(x, nslices, self._use_fused(x, nslices)).reshape(b, c, depth, h, w)
        return x + out if self.residual else out

    def _use_fused(self, x: torch.Tensor, nslices: int) -> bool:
        # a trace (fvcore's MAC count) records the per-branch path: the Triton kernels are opaque to it
        if not self.fused or torch.jit.is_tracing() or not fused_available(x.device):
            return False
        if self.scan_backend == "triton":
            return True
        if self.scan_backend != "auto" or x.device.type != "cuda":
            return False
        return self._choose_fused(x, nslices)

    def _choose_fused(self, x: torch.Tensor, nslices: int) -> bool:
        """``auto``: time the fused path against the per-branch one once per input signature, keep the faster.

        Where measuring is not allowed (inside a CUDA-graph capture, under ``torch.compile``), the choice
        measured earlier for this signature holds (a capture's warm-up makes it, timing kernels only: see
        :func:`segresmamba.ssm.scan.timing_kernels`); with none, the per-branch path."""
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        description = (f"ToM dim {self.dim} x {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                       f"{f' autocast {autocast}' if autocast else ''} nslices {nslices}{' +grad' if torch.is_grad_enabled() else ''}"
                       f"{' (kernel time)' if scan_mod.timing_kernels_now() else ''}")
        known = scan_mod.recorded_auto_choice(description)
        if known is None and scan_mod._measuring_allowed():
            known, times = scan_mod.measure_fastest(
                {"triton_fused": lambda a: self._mix(a[0], nslices, True), "per_branch": lambda a: self._mix(a[0], nslices, False)},
                (x,), wrt=tuple(self.parameters()),
            )
            scan_mod.record_auto_choice(description, known, times)
        return known == "triton_fused"

    def _mix(self, x: torch.Tensor, nslices: int, fused: bool) -> torch.Tensor:
        """out_proj of the summed branch outputs, (B, C, L) laid out in memory as the map x, without the residual."""
        if fused:
            # imports Triton, on first use
            from segresmamba.ssm.triton.fused_tom import tri_oriented_mix
            from segresmamba.ssm.triton.token_norm import token_layer_norm, token_layer_norm_applies

            # the norm reads the map in place and writes the tokens in the dtype in_proj reads: one pass, no copies
            tokens = token_layer_norm(x, self.norm) if token_layer_norm_applies(x, self.norm) else self._tokens(x)
            branches = [self.branches[f"{o}_scan"] for o in self.orientations]
            return tri_oriented_mix(tokens, self.in_proj, self.out_proj, branches, self.orientations, nslices,
                                    channels_last=_channels_last(x))
        xz = self.in_proj(self._tokens(x)).transpose(1, 2)  # (B, 2 d_inner, L)
        summed = None
        for orientation in self.orientations:
            branch = self.branches[f"{orientation}_scan"]
            x_o, z_o = orient(xz, orientation, nslices).chunk(2, dim=1)
            y = unorient(branch(x_o, z_o, self.scan_backend), orientation, nslices)
            summed = y if summed is None else summed + y
        return self._project_out(summed, x)

    def _project_out(self, summed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out_proj of the (B, d_inner, L) branch sum as (B, C, L), laid out in memory as the map x is, so that the
        residual sum (and its gradient) reads both operands alike: an NCDHW map gets (C x d_inner) @ (d_inner x L)
        per batch element, a channels-last one the tokens' (L x d_inner) @ (d_inner x C), transposed as a view. (One
        of two layouts for every map made a strided, unvectorised elementwise kernel of the sum.) A trace (fvcore's MAC
        count) records the Linear, which its handle counts for any batch."""
        if _channels_last(x) or torch.jit.is_tracing():
            return self.out_proj(summed.transpose(1, 2)).transpose(1, 2)
        return torch.matmul(self.out_proj.weight, summed)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm of x's tokens, (B, L, C) in row-major (D, H, W) order."""
        return self.norm(x.flatten(2).transpose(1, 2))
