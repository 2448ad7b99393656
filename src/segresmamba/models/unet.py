"""The "UNET" baseline of the SegResMamba paper: MONAI's residual UNet (Kerfoot et al., "Left-Ventricle
Quantification Using Residual U-Net", STACOM 2018, https://doi.org/10.1007/978-3-030-12029-0_40), a
descendant of Ronneberger et al.'s U-Net (MICCAI 2015, https://arxiv.org/abs/1505.04597)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.nets import UNet

from segresmamba.models.common import check_divisible, check_fraction, check_positive_each
from segresmamba.registry import register_model


@register_model("unet", stride=16, citation="Kerfoot et al., STACOM 2018 (residual U-Net); Ronneberger et al., MICCAI 2015", paper_params_m=4.89)
def unet(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    norm: str | tuple = "batch",
    dropout: float = 0.0,
) -> UNet:
    """MONAI UNet in the configuration of MONAI's 3D segmentation tutorials (spleen, BTCV-style).

    The defaults (channels 16..256, strides 2^4, 2 residual units, BatchNorm, PReLU) are the MONAI
    spleen tutorial's network. They reproduce the paper's Table 7 FLOPs exactly (fvcore, 1 -> 14 at
    128^3: 25.93 G), which pins the architecture; the parameter count is 4.82 M against the paper's
    4.89 M. No UNet configuration reaches 4.89 M with those FLOPs (norm type and output channels move
    the count by < 0.01 M), so the 1.4 % gap is left as a reporting difference in the paper.

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch; each side divisible by the product of ``strides`` (16).
        channels: feature channels per level, one more entry than ``strides``.
        strides: downsampling factor between consecutive levels.
        num_res_units: residual units per level (0 gives plain conv blocks).
        norm: normalisation, "batch" (tutorial) or "instance" (MONAI's default).
        dropout: dropout after each conv, in [0, 1].
    """
    if len(channels) < 2 or len(strides) != len(channels) - 1:
        raise ValueError(
            f"UNet needs len(strides) == len(channels) - 1 >= 1, got channels={tuple(channels)}, strides={tuple(strides)}"
        )
    check_positive_each("channels", channels)
    check_positive_each("strides", strides)
    if num_res_units < 0:
        raise ValueError(f"UNet num_res_units must be >= 0, got {num_res_units}")
    check_fraction("dropout", dropout)
    check_divisible("unet", img_size, math.prod(strides))
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm=norm,
        dropout=dropout,
    )
