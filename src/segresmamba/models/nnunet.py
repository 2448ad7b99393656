"""nnU-Net-style U-Net (Isensee et al., "nnU-Net: a self-configuring method for deep learning-based
biomedical image segmentation", Nature Methods 2021, https://doi.org/10.1038/s41592-020-01008-z):
MONAI's DynUNet built from the topology nnU-Net's planner derives from the patch size and spacing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.nets import DynUNet

from segresmamba.models.common import check_divisible, check_positive
from segresmamba.registry import register_model

MIN_FEATURE_MAP_SIZE = 4  # nnU-Net: never pool an axis below 4 voxels
MAX_ANISOTROPY = 2.0  # nnU-Net: axes coarser than 2x the finest spacing are neither pooled nor 3-kernelled


@dataclass(frozen=True)
class NnUNetPlan:
    """Per-stage topology: ``kernel_sizes[i]`` and ``strides[i]`` of stage i (stage 0 has stride 1)."""

    kernel_sizes: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    filters: tuple[int, ...]

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Product of the strides per axis: every side of the input must be divisible by it."""
        total = [1, 1, 1]
        for stride in self.strides:
            total = [t * s for t, s in zip(total, stride)]
        return tuple(total)  # type: ignore[return-value]


def plan_nnunet(
    patch_size: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    base_filters: int = 32,
    max_filters: int = 320,
    max_pools_per_axis: int = 5,
) -> NnUNetPlan:
    """nnU-Net's topology rule (``get_pool_and_conv_props``), re-derived.

    Starting from the patch size and voxel spacing, add one stage at a time. An axis is pooled (stride 2)
    in that stage when (a) its current size is at least 2 x 4 voxels, so its feature map stays >= 4,
    (b) its current spacing is within 2x of the finest current spacing among the poolable axes
    (anisotropic axes wait until pooling the others has caught up), and (c) it has been pooled fewer than
    ``max_pools_per_axis`` times. If only one axis qualifies it must be at least 3 x 4 voxels. Planning
    stops when no axis qualifies. An axis gets kernel 3 from the first stage where its spacing is within
    2x of the finest, kernel 1 before that; the bottleneck always gets 3. Filters start at
    ``base_filters`` and double per stage up to ``max_filters`` (32 and 320 in nnU-Net). nnU-Net's own
    planner has no per-axis pool cap; 5 matches the 6-stage networks it plans for 128^3 and keeps
    bigger patches from growing a 7th stage.

    Example: 128^3 at isotropic (or BTCV's 1.5/1.5/2.0 mm) spacing gives 6 stages, strides
    1,2,2,2,2,2 on every axis, kernels 3, filters 32, 64, 128, 256, 320, 320; 96^3 gives 5 stages.
    """
    if len(patch_size) != 3 or len(spacing) != 3:
        raise ValueError(f"patch_size and spacing need 3 entries, got {tuple(patch_size)} and {tuple(spacing)}")
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    size = [int(s) for s in patch_size]
    current_spacing = [float(s) for s in spacing]
    pools = [0, 0, 0]
    kernel = [1, 1, 1]
    kernel_sizes: list[tuple[int, int, int]] = []
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    while True:
        poolable = [a for a in range(3) if size[a] >= 2 * MIN_FEATURE_MAP_SIZE]
        if not poolable:
            break
        finest = min(current_spacing[a] for a in poolable)
        poolable = [a for a in poolable if current_spacing[a] / finest < MAX_ANISOTROPY and pools[a] < max_pools_per_axis]
        if not poolable or (len(poolable) == 1 and size[poolable[0]] < 3 * MIN_FEATURE_MAP_SIZE):
            break
        finest_all = min(current_spacing)
        kernel = [3 if k == 3 or current_spacing[a] / finest_all < MAX_ANISOTROPY else 1 for a, k in enumerate(kernel)]
        kernel_sizes.append(tuple(kernel))  # type: ignore[arg-type]
        stride = tuple(2 if a in poolable else 1 for a in range(3))
        strides.append(stride)  # type: ignore[arg-type]
        for a in poolable:
            pools[a] += 1
            current_spacing[a] *= 2
            size[a] = -(-size[a] // 2)
    kernel_sizes.append((3, 3, 3))  # bottleneck
    filters = tuple(min(base_filters * 2**i, max_filters) for i in range(len(strides)))
    return NnUNetPlan(kernel_sizes=tuple(kernel_sizes), strides=tuple(strides), filters=filters)


class NnUNet(DynUNet):
    """DynUNet whose training-mode deep-supervision output is a list of logits at their native
    resolutions, [full, 1/2, 1/4, ...], as nnU-Net computes its loss (labels are downsampled to each
    head, not heads upsampled to the labels). MONAI's DynUNet instead interpolates every head to full
    resolution and stacks them. Eval mode (and ``deep_supervision=False``): one tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            # the skip layers write each supervision head's output into self.heads, highest resolution first
            return [out, *self.heads]
        return out


@register_model("nnunet", stride=None, min_side=8, deep_supervision=True, citation="Isensee et al., nnU-Net, Nature Methods 2021", paper_params_m=31.19)
def nnunet(
    in_channels: int,
    out_channels: int,
    img_size: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    base_filters: int = 32,
    max_filters: int = 320,
    max_pools_per_axis: int = 5,
    deep_supervision: bool = False,
    deep_supervision_heads: int | None = None,
    res_block: bool = False,
) -> NnUNet:
    """nnU-Net's "3d_fullres" plain U-Net: two conv-InstanceNorm-LeakyReLU(0.01) per stage, strided-conv
    downsampling, transposed-conv upsampling, topology from :func:`plan_nnunet`.

    At 128^3, 1 -> 14 channels, the plan gives 31.19 M parameters, the SegResMamba paper's nnUNet
    figure (Table 7), and 479.8 G fvcore FLOPs (paper: 480.06 G). Only the architecture is nnU-Net's: preprocessing, augmentation, loss and schedule
    are this suite's shared pipeline.

    Args:
        in_channels: image channels.
        out_channels: logits per voxel.
        img_size: (D, H, W) training patch, from which the stages are planned; every side must be
            divisible by the plan's total stride (at least 8 voxels to pool at all).
        spacing: voxel spacing (mm) of the resampled data along (D, H, W); only ratios matter. BTCV and
            Spleen at (1.5, 1.5, 2.0) plan like isotropic data (ratio < 2).
        base_filters: channels of the first stage (32).
        max_filters: cap of the per-stage channels (320 in 3D).
        max_pools_per_axis: cap of the stride-2 stages per axis.
        deep_supervision: in training mode return [full-resolution logits, lower-resolution heads...].
        deep_supervision_heads: number of lower-resolution heads; ``None`` gives nnU-Net's choice, one per
            decoder level below full resolution except the coarsest (which nnU-Net gives zero loss weight),
            i.e. 3 for the 6-stage 128^3 plan.
        res_block: residual conv blocks (nnU-Net ResEnc-like) instead of plain ones.
    """
    check_positive(base_filters=base_filters, max_filters=max_filters, max_pools_per_axis=max_pools_per_axis)
    plan = plan_nnunet(img_size, spacing, base_filters, max_filters, max_pools_per_axis)
    if len(plan.strides) < 3:
        raise ValueError(
            f"nnunet: img_size={tuple(img_size)} allows only {len(plan.strides) - 1} pooling stage(s); "
            f"use at least 16 voxels per side (e.g. 32^3 or larger)"
        )
    check_divisible("nnunet", img_size, plan.total_stride)
    num_up = len(plan.strides) - 1
    heads = max(1, num_up - 2) if deep_supervision_heads is None else deep_supervision_heads
    if deep_supervision and not 1 <= heads < num_up:
        raise ValueError(f"nnunet deep_supervision_heads must lie in [1, {num_up - 1}] for this plan, got {heads}")
    return NnUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[list(k) for k in plan.kernel_sizes],
        strides=[list(s) for s in plan.strides],
        upsample_kernel_size=[list(s) for s in plan.strides[1:]],
        filters=list(plan.filters),
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=deep_supervision,
        deep_supr_num=heads,
        res_block=res_block,
    )
