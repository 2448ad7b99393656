"""Building blocks shared by the suite's own architectures.

SegResMamba (Das et al., "SegResMamba: An Efficient Architecture for 3D Medical Image Segmentation",
MIDL 2025): the Convolution Mamba Mixed Block (CMMB), skip adapters, downsampling. SegMamba (Xing et al.,
MICCAI 2024) and 3D UX-Net (Lee et al., ICLR 2023): a UNETR-style decoder, gated spatial convolution,
channel MLP, the UX block. MONAI blocks are used where they exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.blocks.dynunet_block import UnetOutBlock
from monai.networks.blocks.unetr_block import UnetrBasicBlock, UnetrUpBlock
from monai.networks.layers import DropPath
from torch import nn

from segresmamba.ssm import TriOrientedMamba


def conv_in_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    """conv -> InstanceNorm (affine=False, PyTorch default) -> ReLU, the CMMB's unit.

    The ReLU is not in place: PyTorch's instance norm returns a view (it runs batch norm on a reshaped input), and an
    in-place op on a view makes the backward copy the whole gradient twice (CopySlices, as_strided)."""
    return nn.Sequential(conv, nn.InstanceNorm3d(channels), nn.ReLU())


class CMMB(nn.Module):
    """Convolution Mamba Mixed Block, Algorithm 1 of the SegResMamba paper; keeps (C, D, H, W).

    ::

        F1 = Conv5^3 stride 2 (X)          # halves D, H, W
        F2 = Conv3^3 (F1)
        F3 = ToM(F2)                       # inner ToM, at half resolution
        F4 = Conv3^3 (F3)
        F5 = ConvT5^3 stride 2 (F4)        # back to (D, H, W)
        F6 = F5 + X
        out = ToM(F6)                      # outer ToM, at full resolution

    Each conv is followed by InstanceNorm and ReLU (as in the authors' code).

    Args:
        channels: C.
        use_tom: ``True`` is the paper. ``False`` reproduces the authors' released code, where the inner
            ToM is never called (identity) and the outer one is a plain Conv3d(C, C, 3) without norm or
            activation: the paper's "without ToM" ablation.
        tom_kwargs: settings of both :class:`TriOrientedMamba` layers (d_state, nslices, residual,
            scan_backend, ...).
    """

    def __init__(self, channels: int, use_tom: bool = True, tom_kwargs: dict | None = None) -> None:
        super().__init__()
        c = channels
        self.down = conv_in_relu(nn.Conv3d(c, c, 5, stride=2, padding=2), c)
        self.conv_a = conv_in_relu(nn.Conv3d(c, c, 3, padding=1), c)
        self.conv_b = conv_in_relu(nn.Conv3d(c, c, 3, padding=1), c)
        self.up = conv_in_relu(nn.ConvTranspose3d(c, c, 5, stride=2, padding=2, output_padding=1), c)
        if use_tom:
            self.inner_tom: nn.Module = TriOrientedMamba(c, **(tom_kwargs or {}))
            self.outer_tom: nn.Module = TriOrientedMamba(c, **(tom_kwargs or {}))
        else:
            self.inner_tom = nn.Identity()
            self.outer_tom = nn.Conv3d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.conv_b(self.inner_tom(self.conv_a(self.down(x)))))
        # an odd side s comes back as s + 1 from the stride-2 down/up pair: crop to the input's size
        y = y[..., : x.shape[2], : x.shape[3], : x.shape[4]]
        return self.outer_tom(y + x)


class SkipAdapter(nn.Module):
    """InstanceNorm then a channel MLP (1x1x1 convs C -> 2C -> C with GELU), the skip path to the decoder."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels)
        self.fc1 = nn.Conv3d(channels, 2 * channels, 1)
        self.fc2 = nn.Conv3d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Downsample(nn.Module):
    """The paper's extra conv before downsampling: IN -> Conv3^3 -> IN -> Conv2^3 stride 2 (C_in -> C_out)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.InstanceNorm3d(in_channels),
            nn.Conv3d(in_channels, in_channels, 3, padding=1),
            nn.InstanceNorm3d(in_channels),
            nn.Conv3d(in_channels, out_channels, 2, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

class LayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channel axis of a (B, C, D, H, W) map (ConvNeXt's "channels_first" LayerNorm)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class UnetrStyleDecoder(nn.Module):
    """The UNETR decoder as 3D UX-Net and SegMamba use it, fed by a 4-stage hierarchical encoder.

    Skip path: a residual conv block (MONAI ``UnetrBasicBlock``) on the raw image and on the encoder
    outputs at 1/2, 1/4 and 1/8, widening each to the next level's width; the 1/16 output is widened to
    ``hidden_size``. Up path: four ``UnetrUpBlock`` (transposed conv 2^3, concatenate the skip, residual
    conv block) back to full resolution, one more residual block, then a 1x1x1 conv to the logits.

    Args:
        in_channels: image channels (the first skip block sees the raw image).
        out_channels: logits per voxel.
        feature_sizes: widths of the four encoder outputs (1/2 .. 1/16 resolution).
        hidden_size: width of the bottleneck block on the 1/16 features (768).
        norm_name: normalisation of the conv blocks ("instance").
        res_block: residual conv blocks (True).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        feature_sizes: Sequence[int] = (48, 96, 192, 384),
        hidden_size: int = 768,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        f = list(feature_sizes)
        basic = dict(spatial_dims=3, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block)
        # skip i sees the image (i = 0) or encoder output i - 1 and matches decoder level i's width
        self.skip_blocks = nn.ModuleList(
            UnetrBasicBlock(in_channels=c_in, out_channels=c_out, **basic) for c_in, c_out in zip([in_channels, *f[:3]], f)
        )
        self.bottleneck = UnetrBasicBlock(in_channels=f[3], out_channels=hidden_size, **basic)
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(3, c_in, c_out, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)
            for c_in, c_out in zip([hidden_size, *f[:0:-1]], f[::-1])
        )
        self.refine = UnetrBasicBlock(in_channels=f[0], out_channels=f[0], **basic)
        self.out = UnetOutBlock(3, f[0], out_channels)

    def forward(self, image: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        skips = [block(x) for block, x in zip(self.skip_blocks, [image, *features[:3]])]
        x = self.bottleneck(features[3])
        for up, skip in zip(self.up_blocks, reversed(skips)):
            x = up(x, skip)
        return self.out(self.refine(x))


class GatedSpatialConv(nn.Module):
    """SegMamba's gated spatial convolution (GSC), as in the authors' code.

    ``y = CNA1(CNA3(CNA3(x)) + CNA1(x)) + x`` with CNA_k = Conv k^3 -> InstanceNorm -> ReLU. The paper's
    figure draws Norm-Conv-Act blocks, one 3^3 conv and a *multiplicative* gate; the code (additive, two
    3^3 convs, a final 1^3 conv) is what gives the published 67.36 M parameters, so it is followed here.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()

        def cna(kernel_size: int) -> Convolution:
            return Convolution(3, channels, channels, kernel_size=kernel_size, norm="INSTANCE", act="RELU")

        self.spatial = nn.Sequential(cna(3), cna(3))
        self.pointwise = cna(1)
        self.fuse = cna(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.spatial(x) + self.pointwise(x)) + x


class ChannelMLP(nn.Module):
    """Pointwise MLP on a feature map: 1x1x1 conv C -> hidden, GELU, 1x1x1 conv hidden -> C."""

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(channels, hidden_channels, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class UXBlock(nn.Module):
    """3D UX-Net block: depthwise k^3 conv, LayerNorm, grouped pointwise expansion MLP, layer scale, residual.

    ``y = x + DropPath(gamma * PW2(GELU(PW1(LN(DWConv(x))))))``. The pointwise convs are grouped with one
    group per channel ("depthwise convolution scaling" in the paper: each channel expands to
    ``mlp_ratio`` channels and back on its own), which is what the authors' code does and what
    reproduces the published 53.01 M parameters; ``grouped_mlp=False`` gives ConvNeXt's dense MLP.

    Args:
        channels: feature channels C.
        kernel_size: depthwise kernel side (7).
        mlp_ratio: expansion of the pointwise MLP (4).
        grouped_mlp: one group per channel in the pointwise convs (True) or dense (False).
        layer_scale_init: initial value of the per-channel layer scale gamma (1e-6; 0 disables it).
        drop_path: stochastic depth rate of the residual branch.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        mlp_ratio: int = 4,
        grouped_mlp: bool = True,
        layer_scale_init: float = 1e-6,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        groups = channels if grouped_mlp else 1
        self.dwconv = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = LayerNorm3d(channels)
        self.pwconv1 = nn.Conv3d(channels, mlp_ratio * channels, 1, groups=groups)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv3d(mlp_ratio * channels, channels, 1, groups=groups)
        self.gamma = nn.Parameter(torch.full((channels, 1, 1, 1), layer_scale_init)) if layer_scale_init > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y)
