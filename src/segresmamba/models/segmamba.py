"""SegMamba (Xing et al., "SegMamba: Long-range Sequential Modeling Mamba For 3D Medical Image
Segmentation", MICCAI 2024, https://arxiv.org/abs/2401.13560), reimplemented on this suite's ToM layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segresmamba.models.blocks import ChannelMLP, GatedSpatialConv, UnetrStyleDecoder
from segresmamba.models.common import check_divisible, check_positive, check_positive_each
from segresmamba.registry import register_model
from segresmamba.ssm import TriOrientedMamba

TOTAL_STRIDE = 16  # stride-2 stem, then three stride-2 downsamples


class SegMambaEncoder(nn.Module):
    """SegMamba's encoder: 7^3 stride-2 stem, then per stage [downsample], GSC, ``depth`` TSMamba layers,
    and an InstanceNorm + MLP on the stage output that feeds the decoder (the raw output goes on).

    Each TSMamba layer is a tri-oriented Mamba (forward, reverse, inter-slice scans) with a pre-norm
    residual, ``x + ToM(LN(x))``, as in the authors' code since June 2024.

    Args:
        in_channels: image channels.
        feature_sizes: widths of the four stages (1/2 .. 1/16 resolution).
        depths: TSMamba layers per stage.
        nslices: chunks of the inter-slice scan per stage (one value or one per stage); ``None`` uses the
            depth D of each stage's map, a true depth-first scan, equal to the authors' 64/32/16/8 at 128^3.
        tom_kwargs: further :class:`~segresmamba.ssm.TriOrientedMamba` settings (d_state, d_conv, expand,
            scan_backend).
    """

    def __init__(
        self,
        in_channels: int,
        feature_sizes: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 2),
        nslices: Sequence[int | None] = (None, None, None, None),
        tom_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        f = list(feature_sizes)
        tom_kwargs = tom_kwargs or {}
        self.stem = nn.Conv3d(in_channels, f[0], kernel_size=7, stride=2, padding=3)
        self.downsamples = nn.ModuleList(
            nn.Sequential(nn.InstanceNorm3d(f[i]), nn.Conv3d(f[i], f[i + 1], kernel_size=2, stride=2)) for i in range(3)
        )
        self.gscs = nn.ModuleList(GatedSpatialConv(c) for c in f)
        self.stages = nn.ModuleList(
            nn.Sequential(*(TriOrientedMamba(c, nslices=n, residual=True, **tom_kwargs) for _ in range(depth)))
            for c, depth, n in zip(f, depths, nslices)
        )
        self.out_norms = nn.ModuleList(nn.InstanceNorm3d(c) for c in f)
        self.out_mlps = nn.ModuleList(ChannelMLP(c, 2 * c) for c in f)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, (gsc, stage, norm, mlp) in enumerate(zip(self.gscs, self.stages, self.out_norms, self.out_mlps)):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = stage(gsc(x))
            outs.append(mlp(norm(x)))
        return outs


class SegMamba(nn.Module):
    """SegMamba: :class:`SegMambaEncoder` with the UNETR-style decoder of 3D UX-Net
    (:class:`~segresmamba.models.blocks.UnetrStyleDecoder`, hidden size 768).

    Follows the authors' code, which differs from the paper's figures: a dense (not depthwise) stem conv,
    an additive GSC, and no feature-level uncertainty estimation (FUE) module on the skips. With the
    defaults: 67.36 M parameters for 1 -> 14 channels, the figure of SegResMamba's Table 7.

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        feature_sizes: widths of the four encoder stages.
        depths: TSMamba layers per stage.
        hidden_size: width of the decoder's bottleneck block.
        nslices: see :class:`SegMambaEncoder`.
        tom_kwargs: see :class:`SegMambaEncoder`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        feature_sizes: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 2),
        hidden_size: int = 768,
        nslices: Sequence[int | None] = (None, None, None, None),
        tom_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.encoder = SegMambaEncoder(in_channels, feature_sizes, depths, nslices, tom_kwargs)
        self.decoder = UnetrStyleDecoder(in_channels, out_channels, feature_sizes, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x))


@register_model("segmamba", stride=16, citation="Xing et al., SegMamba, MICCAI 2024", paper_params_m=67.36)
def segmamba(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    feature_sizes: Sequence[int] = (48, 96, 192, 384),
    depths: Sequence[int] = (2, 2, 2, 2),
    hidden_size: int = 768,
    nslices: int | Sequence[int | None] | None = None,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    scan_backend: str = "auto",
) -> SegMamba:
    """SegMamba with the authors' settings (see :class:`SegMamba`).

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch; each side divisible by 16.
        feature_sizes: widths of the four encoder stages (48, 96, 192, 384).
        depths: TSMamba layers per stage (2, 2, 2, 2).
        hidden_size: decoder bottleneck width (768).
        nslices: inter-slice scan chunks: ``None`` (depth-first at every stage, the default), one int for all
            stages, or one entry per stage (the authors' code: 64, 32, 16, 8 for 128^3 patches). Each
            stage's token count D*H*W must be divisible by its value.
        d_state: SSM state size (16).
        d_conv: causal conv width of the Mamba branches (4).
        expand: Mamba inner width factor (2).
        scan_backend: selective-scan implementation, see :mod:`segresmamba.ssm` ("auto" picks the fastest
            available: the CUDA kernel on GPU, the PyTorch reference otherwise).
    """
    if len(feature_sizes) != 4 or len(depths) != 4:
        raise ValueError(
            f"SegMamba has 4 stages: feature_sizes and depths need 4 entries, got {tuple(feature_sizes)} and {tuple(depths)}"
        )
    check_positive(hidden_size=hidden_size, d_state=d_state, d_conv=d_conv, expand=expand)
    check_positive_each("feature_sizes", feature_sizes)
    check_positive_each("depths", depths)
    check_divisible("segmamba", img_size, TOTAL_STRIDE)
    per_stage = [nslices] * 4 if nslices is None or isinstance(nslices, int) else list(nslices)
    if len(per_stage) != 4:
        raise ValueError(f"SegMamba nslices needs one value or 4 (one per stage), got {nslices!r}")
    for i, n in enumerate(per_stage):
        tokens = 1
        for side in img_size:
            tokens *= side // 2 ** (i + 1)
        if n is not None and (n < 1 or tokens % n):
            raise ValueError(
                f"SegMamba nslices={n} at stage {i} must divide that stage's {tokens} tokens "
                f"(img_size {tuple(img_size)} / {2 ** (i + 1)}); use None for a depth-first scan"
            )
    tom_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
    return SegMamba(in_channels, out_channels, feature_sizes, depths, hidden_size, per_stage, tom_kwargs)
