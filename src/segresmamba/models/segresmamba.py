"""SegResMamba (Das et al., "SegResMamba: An Efficient Architecture for 3D Medical Image Segmentation",
MIDL 2025, PMLR 301: 280-292)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.segresnet_block import ResBlock, get_conv_layer, get_upsample_layer
from monai.networks.layers.factories import Act
from monai.utils import UpsampleMode
from torch import nn

from segresmamba.models.blocks import CMMB, Downsample, SkipAdapter
from segresmamba.registry import normalize_img_size, register_model


class SegResMamba(nn.Module):
    """Residual-conv encoder with tri-oriented Mamba blocks and a light SegResNet-style decoder.

    Encoder: a 7^3 stride-2 stem, then four stages, each one CMMB (two ToM layers, see
    :class:`~segresmamba.models.blocks.CMMB`) followed by an IN + MLP skip adapter; between stages the
    paper's extra conv before a stride-2 downsample. Decoder (MONAI SegResNet, Myronenko 2018): per level a
    1x1x1 conv halving the channels, trilinear x2 upsampling, the skip *added*, one residual block
    (GroupNorm 8, ReLU). Head: ConvTranspose 2^3 stride 2 back to the input resolution.

    Layer settings follow the authors' code where the paper is silent (channels 48/96/192/384, Mamba
    d_state 16, d_conv 4, expand 2). Two readings differ from the released code and are documented
    deviations: the ToM layers are *run* (the released code builds them but never calls them; use
    ``use_tom=False`` for that behaviour), and the decoder input has 384 channels, not the 768 the
    paper's text mentions (the code and the channel arithmetic both give 384).

    Args:
        in_channels: image channels (BraTS 4, CT 1).
        out_channels: logits per voxel (BraTS regions 3, BTCV 14, Spleen 2).
        img_size: training patch (D, H, W); each side must be divisible by 16 (total stride) and at
            least 48 (the deepest CMMB halves the 1/16 map once more).
        feature_sizes: channels of the four encoder stages.
        use_tom: run ToM layers (paper) or the released code's convolutional stand-in.
        tom_kwargs: :class:`~segresmamba.ssm.TriOrientedMamba` settings shared by all ToM layers, e.g.
            ``{"nslices": 4, "residual": False, "scan_backend": "torch"}``.
        norm_groups: GroupNorm groups in the decoder.
    """

    total_stride = 16
    # the innermost CMMB halves the 1/16 map once more; InstanceNorm needs > 1 voxel there
    min_side = 48

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int | Sequence[int] = 128,
        feature_sizes: Sequence[int] = (48, 96, 192, 384),
        use_tom: bool = True,
        tom_kwargs: dict | None = None,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
        if len(feature_sizes) != 4:
            raise ValueError(f"feature_sizes must list 4 stage widths, got {tuple(feature_sizes)}")
        if any(f % norm_groups or f % 2 for f in feature_sizes):
            raise ValueError(f"every feature size must be even and divisible by norm_groups={norm_groups}, got {tuple(feature_sizes)}")
        self.img_size = normalize_img_size(img_size)
        self._check_spatial(self.img_size, "img_size")
        self.in_channels, self.out_channels = in_channels, out_channels
        f = list(feature_sizes)
        self.stem = nn.Conv3d(in_channels, f[0], 7, stride=2, padding=3)
        self.stages = nn.ModuleList(CMMB(c, use_tom=use_tom, tom_kwargs=tom_kwargs) for c in f)
        self.skips = nn.ModuleList(SkipAdapter(c) for c in f)
        self.downsamples = nn.ModuleList(Downsample(f[i], f[i + 1]) for i in range(3))
        norm = ("GROUP", {"num_groups": norm_groups})
        act = (Act.RELU, {"inplace": True})
        self.up_samples = nn.ModuleList(
            nn.Sequential(
                get_conv_layer(3, c, c // 2, kernel_size=1),
                get_upsample_layer(3, c // 2, upsample_mode=UpsampleMode.NONTRAINABLE),
            )
            for c in reversed(f[1:])
        )
        self.up_blocks = nn.ModuleList(ResBlock(3, c // 2, norm=norm, act=act) for c in reversed(f[1:]))
        self.head = nn.ConvTranspose3d(f[0], out_channels, 2, stride=2)

    def _check_spatial(self, size: Sequence[int], what: str) -> None:
        if any(s < self.min_side for s in size):
            raise ValueError(f"SegResMamba needs every side of {what} >= {self.min_side}; got {tuple(size)}")
        bad = [s for s in size if s % self.total_stride]
        if bad:
            fixed = tuple(max(self.total_stride, round(s / self.total_stride) * self.total_stride) for s in size)
            raise ValueError(
                f"SegResMamba needs every side of {what} divisible by {self.total_stride}; got {tuple(size)}, "
                f"use e.g. {fixed}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SegResMamba(in_channels={self.in_channels}) expects (B, {self.in_channels}, D, H, W), got "
                f"{tuple(x.shape)}; set in_channels to the image's channel count"
            )
        self._check_spatial(x.shape[2:], "the input")
        x = self.stem(x)
        skips = []
        for i, (stage, skip) in enumerate(zip(self.stages, self.skips)):
            x = stage(x)
            skips.append(skip(x))
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        x = skips[-1]
        for up, block, skip in zip(self.up_samples, self.up_blocks, reversed(skips[:-1])):
            x = block(up(x) + skip)
        return self.head(x)


@register_model("segresmamba", stride=16, min_side=48, citation="Das et al., SegResMamba, MIDL 2025", paper_params_m=119.98)
def segresmamba(in_channels: int, out_channels: int, img_size: Sequence[int], **kwargs) -> SegResMamba:
    """SegResMamba as in the paper: two ToM layers per CMMB."""
    return SegResMamba(in_channels, out_channels, img_size, use_tom=True, **kwargs)


@register_model("segresmamba_notom", stride=16, min_side=48, citation="Das et al., SegResMamba, MIDL 2025 (released code: ToM built, never called)")
def segresmamba_notom(in_channels: int, out_channels: int, img_size: Sequence[int], **kwargs) -> SegResMamba:
    """SegResMamba as released by the authors: ToM built but never run (the paper's "without ToM")."""
    if kwargs.pop("tom_kwargs", None):
        raise ValueError("segresmamba_notom has no ToM layers; drop tom_kwargs")
    return SegResMamba(in_channels, out_channels, img_size, use_tom=False, **kwargs)
