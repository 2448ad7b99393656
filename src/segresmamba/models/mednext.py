"""MedNeXt (Roy et al., "MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image
Segmentation", MICCAI 2023, https://arxiv.org/abs/2303.09975), as MONAI builds it."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets.mednext import create_mednext
from torch import nn

from segresmamba.models.common import DeepSupervisionList, check_divisible
from segresmamba.registry import register_model

VARIANTS = ("S", "B", "M", "L")
TOTAL_STRIDE = 16  # four 2x downsampling blocks


@register_model("mednext", stride=16, deep_supervision=True, citation="Roy et al., MedNeXt, MICCAI 2023")
def mednext(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    variant: str = "S",
    kernel_size: int = 3,
    deep_supervision: bool = False,
) -> nn.Module:
    """MedNeXt: a ConvNeXt-style 3D U-Net (depthwise kxkxk conv, GroupNorm, expansion MLP) with
    residual ConvNeXt up- and downsampling blocks.

    The default is the smallest published variant, MedNeXt-S with kernel 3 (5.55 M parameters for
    1 -> 14 channels), the cheapest member of the family; the paper's best BTCV results use larger
    variants and kernel 5 (``variant="L", kernel_size=5``: 62.9 M).

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch; each side divisible by 16.
        variant: "S", "B", "M" or "L" (the paper's Table 1: expansion ratios and blocks per stage).
        kernel_size: depthwise kernel side, odd (3 or 5 in the paper).
        deep_supervision: in training mode return a list [full-resolution logits, then the four coarser
            heads at 1/2 .. 1/16 resolution]; in eval mode one tensor either way. The network is then
            wrapped (state-dict keys gain a ``net.`` prefix).
    """
    if variant.upper() not in VARIANTS:
        raise ValueError(f"MedNeXt variant must be one of {VARIANTS}, got {variant!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"MedNeXt kernel_size must be a positive odd int, got {kernel_size}")
    check_divisible("mednext", img_size, TOTAL_STRIDE)
    net = create_mednext(
        variant.upper(),
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernel_size,
        deep_supervision=deep_supervision,
    )
    return DeepSupervisionList(net) if deep_supervision else net
