"""3D UX-Net (Lee et al., "3D UX-Net: A Large Kernel Volumetric ConvNet Modernizing Hierarchical
Transformer for Medical Image Segmentation", ICLR 2023, https://arxiv.org/abs/2209.15076), reimplemented."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segresmamba.models.blocks import LayerNorm3d, UnetrStyleDecoder, UXBlock
from segresmamba.models.common import check_divisible, check_fraction, check_positive, check_positive_each
from segresmamba.registry import register_model

TOTAL_STRIDE = 16  # stride-2 stem, then three stride-2 downsamples


class UXNetEncoder(nn.Module):
    """3D UX-Net's encoder: a 7^3 stride-2 stem conv + LayerNorm, then four stages of :class:`UXBlock`,
    with LayerNorm + 2^3 stride-2 conv between stages and a LayerNorm on every stage output.

    Args:
        in_channels: image channels.
        feature_sizes: widths of the four stages (1/2 .. 1/16 resolution).
        depths: UX blocks per stage.
        kernel_size: depthwise kernel side.
        grouped_mlp: see :class:`UXBlock`.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks to this value.
        layer_scale_init: see :class:`UXBlock`.
    """

    def __init__(
        self,
        in_channels: int,
        feature_sizes: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 2),
        kernel_size: int = 7,
        grouped_mlp: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        f = list(feature_sizes)
        self.stem = nn.Sequential(nn.Conv3d(in_channels, f[0], kernel_size=7, stride=2, padding=3), LayerNorm3d(f[0]))
        self.downsamples = nn.ModuleList(
            nn.Sequential(LayerNorm3d(f[i]), nn.Conv3d(f[i], f[i + 1], kernel_size=2, stride=2)) for i in range(3)
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    UXBlock(
                        c, kernel_size, grouped_mlp=grouped_mlp, layer_scale_init=layer_scale_init, drop_path=rates[start + j]
                    )
                    for j in range(depth)
                )
            )
            for c, depth, start in zip(f, depths, starts)
        )
        self.out_norms = nn.ModuleList(LayerNorm3d(c) for c in f)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, (stage, norm) in enumerate(zip(self.stages, self.out_norms)):
            if i > 0:
                x = self.downsamples[i - 1](x)
            x = stage(x)
            outs.append(norm(x))
        return outs


class UXNet3D(nn.Module):
    """3D UX-Net: :class:`UXNetEncoder` with the UNETR-style decoder
    (:class:`~segresmamba.models.blocks.UnetrStyleDecoder`).

    With the defaults (the authors' BTCV/FLARE model: widths 48..384, depths 2/2/2/2, depthwise 7^3,
    grouped pointwise MLP x4, decoder hidden size 768): 53.01 M parameters for 1 -> 14 channels, the
    figure of SegResMamba's Table 7.

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        feature_sizes: widths of the four encoder stages.
        depths: UX blocks per stage.
        hidden_size: width of the decoder's bottleneck block.
        kernel_size: depthwise kernel side.
        grouped_mlp: see :class:`UXBlock`.
        drop_path_rate: see :class:`UXNetEncoder`.
        layer_scale_init: see :class:`UXBlock`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        feature_sizes: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 2),
        hidden_size: int = 768,
        kernel_size: int = 7,
        grouped_mlp: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        self.encoder = UXNetEncoder(
            in_channels, feature_sizes, depths, kernel_size, grouped_mlp, drop_path_rate, layer_scale_init
        )
        self.decoder = UnetrStyleDecoder(in_channels, out_channels, feature_sizes, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x, self.encoder(x))


@register_model("uxnet3d", stride=16, citation="Lee et al., 3D UX-Net, ICLR 2023", paper_params_m=53.01)
def uxnet3d(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    feature_sizes: Sequence[int] = (48, 96, 192, 384),
    depths: Sequence[int] = (2, 2, 2, 2),
    hidden_size: int = 768,
    kernel_size: int = 7,
    grouped_mlp: bool = True,
    drop_path_rate: float = 0.0,
    layer_scale_init: float = 1e-6,
) -> UXNet3D:
    """3D UX-Net with the authors' settings (see :class:`UXNet3D`).

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch; each side divisible by 16.
        feature_sizes: widths of the four encoder stages (48, 96, 192, 384).
        depths: UX blocks per stage (2, 2, 2, 2).
        hidden_size: decoder bottleneck width (768).
        kernel_size: depthwise kernel side, odd (7; the paper's ablation also tries 13 and 21).
        grouped_mlp: one group per channel in the pointwise MLP (True, the paper's "depthwise convolution
            scaling"); False gives a dense ConvNeXt MLP.
        drop_path_rate: stochastic depth rate, in [0, 1] (0).
        layer_scale_init: initial layer scale (1e-6; 0 disables it).
    """
    if len(feature_sizes) != 4 or len(depths) != 4:
        raise ValueError(
            f"3D UX-Net has 4 stages: feature_sizes and depths need 4 entries, got {tuple(feature_sizes)} and {tuple(depths)}"
        )
    check_positive(hidden_size=hidden_size)
    check_positive_each("feature_sizes", feature_sizes)
    check_positive_each("depths", depths)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"3D UX-Net kernel_size must be a positive odd int, got {kernel_size}")
    check_fraction("drop_path_rate", drop_path_rate)
    if layer_scale_init < 0:
        raise ValueError(f"3D UX-Net layer_scale_init must be >= 0, got {layer_scale_init}")
    check_divisible("uxnet3d", img_size, TOTAL_STRIDE)
    return UXNet3D(
        in_channels, out_channels, feature_sizes, depths, hidden_size, kernel_size, grouped_mlp, drop_path_rate, layer_scale_init
    )
