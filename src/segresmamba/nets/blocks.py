"""Building blocks of SegResMamba (Das et al., "SegResMamba: An Efficient Architecture for 3D Medical
Image Segmentation", MIDL 2025): the Convolution Mamba Mixed Block (CMMB), skip adapters, downsampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segresmamba.ssm import TriOrientedMamba


def conv_in_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    """conv -> InstanceNorm (affine=False, PyTorch default) -> ReLU, the CMMB's unit."""
    return nn.Sequential(conv, nn.InstanceNorm3d(channels), nn.ReLU(inplace=True))


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
