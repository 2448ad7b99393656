"""The ``nnunet`` recipe's training augmentation: nnU-Net v2's default data augmentation, from MONAI transforms.

Follows Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18:203-211 (2021), as implemented by ``nnUNetTrainer.get_training_transforms``
and ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` of nnU-Net v2 (batchgeneratorsv2
transforms). In nnU-Net's order, on a 3D patch:

1. Patch sampling with foreground oversampling: each patch is centred on a foreground voxel with probability
   ``foreground_fraction`` (0.33), otherwise on a background voxel anywhere in the volume, air included. The
   region cut out is larger than the patch (:func:`initial_patch_size`: the patch rotated by the largest
   angle about each axis, divided by 0.85, nnU-Net's ``get_patch_size``), so that rotated and scaled
   patches take real voxels where a patch-sized crop would have zero corners. As in nnU-Net, the margin
   covers one axis's full rotation and scales up to 1/0.85; rotations about several axes at once, or
   scales towards 1.4, can still reach past it, and there the patch is zero-padded.
2. Spatial: rotation by U(-30, 30) degrees about every axis (p 0.2) and isotropic scaling (p 0.2),
   resampled once (image bilinear, label nearest) and centre-cropped to the patch; no elastic deformation
   (nnU-Net v2 sets ``p_elastic_deform=0``).
3. Gaussian noise, standard deviation U(0, 0.1), one draw for all channels (p 0.1).
4. Gaussian blur, sigma U(0.5, 1) per axis (p 0.2).
5. Multiplicative brightness U(0.75, 1.25), per channel (p 0.15).
6. Contrast U(0.75, 1.25) about the channel mean, clipped to the channel's former range (p 0.15).
7. Simulated low resolution: nearest downsampling by U(0.5, 1), trilinear upsampling (p 0.25).
8. Gamma with inversion (p 0.1) and without (p 0.3), statistics retained; gamma drawn as nnU-Net's
   ``BGContrast((0.7, 1.5))``: half the time from U(0.7, 1), half from U(1, 1.5).
9. Mirroring on each axis with p 0.5.

Where this differs from nnU-Net v2, and why:

- Foreground oversampling is a per-patch probability (nnU-Net's ``probabilistic_oversampling`` option);
  nnU-Net's default forces the last third of each batch (one patch of two), which needs a batch-level
  sampler that MONAI's per-volume dictionary transforms do not have. Over many patches both give 33 %.
- A foreground centre is any foreground voxel (MONAI ``RandCropByPosNegLabeld``); nnU-Net first picks a
  foreground class uniformly, then one of its voxels, which favours small organs in multi-class tasks.
- A non-forced centre is a uniformly drawn background voxel; nnU-Net draws the patch position uniformly,
  which may also land on foreground. Foreground is a small part of most volumes, so the two are close.
  Both keep the patch inside the (padded) volume: centres near a border are moved inwards.
- Scaling draws a zoom factor z in [1/1.4, 1/0.7] uniformly (MONAI ``RandZoomd``, one factor for every
  axis as in nnU-Net); nnU-Net draws the coordinate scale s = 1/z uniformly in [0.7, 1.4]. Same range,
  slightly different density.
- Rotation and zoom are fused into one resampling by MONAI's lazy resampling. Labels are resampled by
  nearest neighbour; nnU-Net interpolates each label's mask bilinearly and thresholds at 0.5, which gives
  smoother label borders after rotation.
- Blur, low resolution and gamma act on all channels of an image together (MONAI's transforms do not
  draw per channel); nnU-Net draws them per channel (blur and low resolution with p 0.5 per channel, gamma
  and its statistics per channel). Identical for single-channel data.
- nnU-Net sets voxels outside the nonzero mask back to 0 after augmentation for masked-normalised
  modalities (``MaskImageTransform``); here they keep their augmented values. Evaluation here covers the
  whole volume (nnU-Net crops to the nonzero region and pastes the rest back as background), so the
  network must learn what lies outside the mask as well.
- No cascade (``MoveSegAsOneHotToData``) and no region-based training: region labels (BraTS TC/WT/ET)
  are built by the dataset before augmentation; the nearest-neighbour resampling keeps them exact.
- Deep-supervision targets are not made here: the task downsamples the label for the lower heads.
- No "dummy 2D" augmentation for strongly anisotropic patches: every patch is augmented in 3D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    BorderPadd,
    CenterSpatialCropd,
    Compose,
    EnsureTyped,
    OneOf,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
    SpatialPadd,
    ThresholdIntensityd,
)

__all__ = ["nnunet_augmentations", "initial_patch_size", "FusedResampling", "NNUNET_ROTATION_DEG", "NNUNET_SCALING", "OUTSIDE_VOLUME"]

KEYS = ["image", "label"]
NNUNET_ROTATION_DEG = 30.0
"""Largest rotation about each axis of nnU-Net v2's 3D configurations, in degrees."""
NNUNET_SCALING = (0.7, 1.4)
"""nnU-Net v2's coordinate scale range (a scale above 1 shrinks the anatomy)."""
NNUNET_PATCH_SCALE = 0.85
"""nnU-Net's ``get_patch_size`` divides the rotated patch extent by this (its legacy smallest scale)."""
OUTSIDE_VOLUME = -1.0e4
"""Image value of the padding around a volume while a patch centre is drawn: far below any normalised
intensity, so that padding is never a centre, while air (about -1 to -10 after normalisation) is."""


def initial_patch_size(
    patch_size: Sequence[int], rotation_deg: float = NNUNET_ROTATION_DEG, smallest_scale: float = NNUNET_PATCH_SCALE
) -> list[int]:
    """Side of the region cut out before the spatial transform (nnU-Net v2's ``get_patch_size``).

    The patch is rotated by ``rotation_deg`` about each axis in turn; the largest bounding-box side per
    axis over the unrotated and the three rotated patches is divided by ``smallest_scale`` (for a cubic
    patch this is nnU-Net's size: 64 -> 102, 128 -> 206). Each side is then raised so
    that it exceeds the patch side by an even number of voxels (the centre crop back to the patch then
    falls on whole voxels, so an untransformed patch is copied, not interpolated).
    """
    patch = [int(p) for p in patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive sides, got {list(patch_size)}")
    if not 0.0 <= rotation_deg <= 90.0:
        raise ValueError(f"rotation_deg must be within [0, 90], got {rotation_deg}")
    angle = math.radians(rotation_deg)
    extent = [float(p) for p in patch]
    for axis in range(3):  # a rotation about `axis` turns the patch within the plane of the other two axes
        a, b = (i for i in range(3) if i != axis)
        extent[a] = max(extent[a], patch[a] * math.cos(angle) + patch[b] * math.sin(angle))
        extent[b] = max(extent[b], patch[a] * math.sin(angle) + patch[b] * math.cos(angle))
    sides = [int(e / smallest_scale) for e in extent]
    return [s + (s - p) % 2 for s, p in zip(sides, patch)]


class FusedResampling(Compose):
    """A MONAI ``Compose`` that always runs lazily, so that its spatial transforms are resampled once, with
    its own per-key ``overrides`` (MONAI runs a nested ``Compose`` eagerly when the outer one is eager)."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy: bool | None = None):
        return super().__call__(input_, start=start, end=end, threading=threading, lazy=True)


def _bg_contrast_gamma(prob: float, invert_image: bool) -> OneOf:
    """Gamma as nnU-Net's ``GammaTransform(gamma=BGContrast((0.7, 1.5)), p_retain_stats=1)`` applied with
    probability ``prob``: one of two MONAI gamma transforms, each taken half the time."""
    return OneOf(
        [
            RandAdjustContrastd(keys="image", prob=prob, gamma=(0.7, 1.0), invert_image=invert_image, retain_stats=True),
            RandAdjustContrastd(keys="image", prob=prob, gamma=(1.0, 1.5), invert_image=invert_image, retain_stats=True),
        ],
        weights=(0.5, 0.5),
    )


def nnunet_augmentations(
    patch_size: Sequence[int],
    num_samples: int = 1,
    foreground_fraction: float = 0.33,
    rotation_deg: float = NNUNET_ROTATION_DEG,
    scaling: tuple[float, float] = NNUNET_SCALING,
) -> list:
    """nnU-Net v2's default training augmentation as MONAI dictionary transforms (see the module docstring).

    Input: a preprocessed (resampled, normalised) whole volume ``{"image": (C, X, Y, Z), "label": (1 or
    regions, X, Y, Z)}``, any size (smaller volumes are padded). Output: a list of ``num_samples`` patch
    dicts of ``patch_size``, as MetaTensors; the caller casts them.

    Args:
        patch_size: the training patch (D, H, W).
        num_samples: patches drawn per volume.
        foreground_fraction: probability that a patch is centred on foreground (the recipe's
            ``foreground_oversampling``).
        rotation_deg: largest rotation about each axis.
        scaling: nnU-Net's coordinate scale range (low, high); the zoom factor lies in [1/high, 1/low].
    """
    patch = [int(p) for p in patch_size]
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0.0 <= foreground_fraction <= 1.0:
        raise ValueError(f"foreground_fraction must be within [0, 1], got {foreground_fraction}")
    low, high = scaling
    if not 0.0 < low <= high:
        raise ValueError(f"scaling must be (low, high) with 0 < low <= high, got {scaling}")
    region = initial_patch_size(patch, rotation_deg)
    margin = [(r - p) // 2 for r, p in zip(region, patch)]
    angle = math.radians(rotation_deg)
    modes = {"mode": ("bilinear", "nearest"), "padding_mode": ("zeros", "zeros")}
    spatial = FusedResampling(
        [
            RandZoomd(keys=KEYS, prob=0.2, min_zoom=1.0 / high, max_zoom=1.0 / low, keep_size=True, **modes),
            RandRotated(keys=KEYS, prob=0.2, range_x=angle, range_y=angle, range_z=angle, keep_size=True, **modes),
            CenterSpatialCropd(keys=KEYS, roi_size=patch),
        ],
        overrides={
            "image": {"mode": "bilinear", "padding_mode": "zeros"},
            "label": {"mode": "nearest", "padding_mode": "zeros"},
        },
    )
    return [
        EnsureTyped(keys=KEYS, track_meta=True),  # lazy resampling works on MetaTensors
        # pad by the extra margin, so that patch centres reach as close to the border as a patch-sized
        # crop would; the image's padding is marked OUTSIDE_VOLUME so that it is never a centre
        BorderPadd(keys="image", spatial_border=margin, value=OUTSIDE_VOLUME),
        BorderPadd(keys="label", spatial_border=margin, value=0),
        SpatialPadd(keys="image", spatial_size=region, value=OUTSIDE_VOLUME),
        SpatialPadd(keys="label", spatial_size=region, value=0),
        RandCropByPosNegLabeld(
            keys=KEYS, label_key="label", spatial_size=region, pos=foreground_fraction, neg=1.0 - foreground_fraction,
            num_samples=num_samples, image_key="image", image_threshold=OUTSIDE_VOLUME / 2,
        ),
        ThresholdIntensityd(keys="image", threshold=OUTSIDE_VOLUME / 2, above=True, cval=0.0),  # padding -> 0
        spatial,
        RandGaussianNoised(keys="image", prob=0.1, mean=0.0, std=0.1, sample_std=True),
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd(keys="image", prob=0.15, factors=0.25, channel_wise=True),
        RandScaleIntensityFixedMeand(
            keys="image", prob=0.15, factors=0.25, fixed_mean=True, preserve_range=True, channel_wise=True
        ),
        RandSimulateLowResolutiond(
            keys="image", prob=0.25, zoom_range=(0.5, 1.0), downsample_mode="nearest", upsample_mode="trilinear"
        ),
        _bg_contrast_gamma(0.1, invert_image=True),
        _bg_contrast_gamma(0.3, invert_image=False),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
    ]
