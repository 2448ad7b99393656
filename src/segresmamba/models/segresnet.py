"""SegResNet (Myronenko, "3D MRI Brain Tumor Segmentation Using Autoencoder Regularization", BrainLes
2018, https://arxiv.org/abs/1810.11654), the encoder-decoder without the VAE branch, as MONAI builds it."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SegResNet

from segresmamba.models.common import check_divisible, check_fraction, check_positive, check_positive_each
from segresmamba.registry import register_model


@register_model("segresnet", stride=8, citation="Myronenko, 3D MRI brain tumor segmentation using autoencoder regularization, BrainLes 2018")
def segresnet(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    init_filters: int = 32,
    blocks_down: Sequence[int] = (1, 2, 2, 4),
    blocks_up: Sequence[int] = (1, 1, 1),
    num_groups: int = 8,
    dropout_prob: float = 0.2,
    upsample_mode: str = "nontrainable",
) -> SegResNet:
    """SegResNet: ResNet-style encoder (GroupNorm, ReLU), light decoder with additive skips.

    Defaults are the paper's: 32 initial filters, 1/2/2/4 encoder blocks, one decoder block per level,
    GroupNorm with 8 groups and spatial dropout 0.2 after the initial convolution. (MONAI's own
    defaults are 8 filters and no dropout; its BraTS tutorial uses 16.) This is also the decoder
    SegResMamba builds on. 18.80 M parameters for 1 -> 14 channels.

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch; each side divisible by 2^(len(blocks_down) - 1) (8).
        init_filters: channels of the first level; doubled per level; divisible by ``num_groups``.
        blocks_down: residual blocks per encoder level.
        blocks_up: residual blocks per decoder level; one entry fewer than ``blocks_down``.
        num_groups: GroupNorm groups.
        dropout_prob: dropout after the initial convolution, in [0, 1] (0 disables it).
        upsample_mode: "nontrainable" (trilinear, the paper), "deconv" or "pixelshuffle".
    """
    check_positive(init_filters=init_filters, num_groups=num_groups)
    if init_filters % num_groups:
        raise ValueError(f"SegResNet init_filters ({init_filters}) must be divisible by num_groups ({num_groups})")
    if len(blocks_down) < 2 or len(blocks_up) != len(blocks_down) - 1:
        raise ValueError(
            f"SegResNet needs len(blocks_up) == len(blocks_down) - 1, got blocks_down={tuple(blocks_down)}, "
            f"blocks_up={tuple(blocks_up)}"
        )
    check_positive_each("blocks_down", blocks_down)
    check_positive_each("blocks_up", blocks_up)
    check_fraction("dropout_prob", dropout_prob)
    if upsample_mode not in ("nontrainable", "deconv", "pixelshuffle"):
        raise ValueError(
            f"SegResNet upsample_mode must be 'nontrainable', 'deconv' or 'pixelshuffle', got {upsample_mode!r}"
        )
    check_divisible("segresnet", img_size, 2 ** (len(blocks_down) - 1))
    return SegResNet(
        spatial_dims=3,
        init_filters=init_filters,
        in_channels=in_channels,
        out_channels=out_channels,
        dropout_prob=dropout_prob or None,
        norm=("GROUP", {"num_groups": num_groups}),
        blocks_down=tuple(blocks_down),
        blocks_up=tuple(blocks_up),
        upsample_mode=upsample_mode,
    )
