"""UNETR (Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022,
https://arxiv.org/abs/2103.10504), as MONAI builds it."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import UNETR

from segresmamba.models.common import check_divisible, check_fraction, check_positive
from segresmamba.registry import register_model

PATCH_SIZE = 16  # UNETR's ViT tokenises 16^3 patches; fixed by the architecture


@register_model("unetr", stride=16, citation="Hatamizadeh et al., UNETR, WACV 2022", paper_params_m=93.01)
def unetr(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    feature_size: int = 16,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    proj_type: str = "conv",
    norm_name: str | tuple = "instance",
    res_block: bool = True,
    dropout_rate: float = 0.0,
    qkv_bias: bool = False,
) -> UNETR:
    """UNETR: a ViT-B/16 encoder (12 layers) whose tokens feed a convolutional U-shaped decoder.

    Defaults are the paper's (ViT-B, feature size 16). The learned position embedding has one
    ``hidden_size`` vector per 16^3 patch, so the parameter count depends on ``img_size``: with
    1 -> 14 channels, 96^3 gives 92.80 M and 128^3 gives 93.03 M. The SegResMamba paper's 93.01 M
    (Table 7, "BTCV configuration") is the 128^3 model as MONAI < 1.4 built it: MONAI 1.4 added a
    ``norm_cross_attn`` LayerNorm to every transformer block (12 x 2 x 768 = 18,432 parameters, unused
    without cross-attention), which is the whole 0.02 M difference. The 128^3 model also gives the
    paper's FLOPs exactly (fvcore, 1 -> 14: 177.44 G); 96^3 would not.

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch; each side divisible by 16 (the ViT patch size). Sliding-window
            inference must use the same size, since the position embedding is fixed to it.
        feature_size: width of the first decoder level (16 in the paper).
        hidden_size: ViT token width (768).
        mlp_dim: ViT MLP width (3072).
        num_heads: attention heads (12); must divide ``hidden_size``.
        proj_type: patch embedding, "conv" or "perceptron".
        norm_name: decoder normalisation ("instance").
        res_block: residual decoder blocks (True).
        dropout_rate: transformer dropout, in [0, 1].
        qkv_bias: bias in the attention's qkv projection (MONAI default False).
    """
    check_positive(feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads)
    if hidden_size % num_heads:
        raise ValueError(f"UNETR hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    check_fraction("dropout_rate", dropout_rate)
    if proj_type not in ("conv", "perceptron"):
        raise ValueError(f"UNETR proj_type must be 'conv' or 'perceptron', got {proj_type!r}")
    check_divisible("unetr", img_size, PATCH_SIZE)
    return UNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=tuple(img_size),
        feature_size=feature_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        proj_type=proj_type,
        norm_name=norm_name,
        res_block=res_block,
        dropout_rate=dropout_rate,
        qkv_bias=qkv_bias,
    )
