"""Swin UNETR (Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
Tumors in MRI Images", BrainLes 2021, https://arxiv.org/abs/2201.01266), as MONAI builds it."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import SwinUNETR

from segresmamba.models.common import check_divisible, check_fraction, check_positive
from segresmamba.registry import register_model

TOTAL_STRIDE = 32  # patch size 2, then four 2x patch-merging stages


@register_model("swinunetr", stride=32, citation="Hatamizadeh et al., Swin UNETR, BrainLes 2021", paper_params_m=62.19)
def swinunetr(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    feature_size: int = 48,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 7,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    dropout_path_rate: float = 0.0,
    use_checkpoint: bool = False,
    use_v2: bool = False,
) -> SwinUNETR:
    """Swin UNETR: a 4-stage Swin Transformer encoder (window attention) with a UNETR-style CNN decoder.

    Defaults are the paper's BTCV/BraTS model (feature size 48, depths 2/2/2/2, heads 3/6/12/24,
    window 7): 62.19 M parameters for 1 -> 14 channels, independent of ``img_size`` (relative position
    bias only). MONAI >= 1.5 takes no ``img_size``; it is used here only to check divisibility.

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch; each side divisible by 32.
        feature_size: embedding width of the first stage; divisible by 12 (MONAI's constraint).
        depths: Swin blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window side.
        drop_rate: dropout after the patch embedding and in the MLPs, in [0, 1].
        attn_drop_rate: attention dropout, in [0, 1].
        dropout_path_rate: stochastic depth rate, in [0, 1].
        use_checkpoint: gradient checkpointing in the Swin stages (less memory, slower steps).
        use_v2: Swin UNETR-V2 (a residual conv block before each stage).
    """
    check_positive(feature_size=feature_size, window_size=window_size)
    if feature_size % 12:
        raise ValueError(f"SwinUNETR feature_size must be divisible by 12, got {feature_size}; e.g. 24, 36 or 48")
    if len(depths) != 4 or len(num_heads) != 4:
        raise ValueError(
            f"SwinUNETR has 4 stages: depths and num_heads need 4 entries, got {tuple(depths)} and {tuple(num_heads)}"
        )
    check_fraction("drop_rate", drop_rate)
    check_fraction("attn_drop_rate", attn_drop_rate)
    check_fraction("dropout_path_rate", dropout_path_rate)
    check_divisible("swinunetr", img_size, TOTAL_STRIDE)
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        window_size=window_size,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        dropout_path_rate=dropout_path_rate,
        use_checkpoint=use_checkpoint,
        use_v2=use_v2,
        spatial_dims=3,
    )
