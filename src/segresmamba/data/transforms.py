"""The paper's preprocessing and augmentation recipes, as MONAI transform chains.

Training chains end in random patches; evaluation chains are deterministic and keep the whole volume
(no crop), which the task scores by sliding-window inference. Every chain ends in plain tensors
(``track_meta=False``): images float32; labels float32 0/1 regions (multilabel) or int64 class indices
(multiclass).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

KEYS = ["image", "label"]
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # the NIfTI world axes, stated to pin MONAI's default

__all__ = [
    "brats_train_transforms",
    "brats_eval_transforms",
    "ct_train_transforms",
    "ct_eval_transforms",
    "patch_augmentations",
]


def _final(label_dtype: torch.dtype) -> list:
    return [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=label_dtype, track_meta=False),
    ]


# -- BraTS 2021 ([PAPER] App. A.1, the SegResMamba / SwinUNETR BraTS21 recipe) -------------------------


def _brats_load() -> list:
    # A list of four channel files is stacked channel-first in the listed order (BRATS_CHANNELS).
    return [
        LoadImaged(keys=KEYS, image_only=True),
        EnsureChannelFirstd(keys="image", channel_dim=0),
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),  # labels 0/1/2/4 -> [TC, WT, ET]
    ]


def brats_train_transforms(patch_size: Sequence[int]) -> Compose:
    """Load, regions, CropForeground(k_divisible=patch), RandSpatialCrop(patch), flips on 3 axes,
    NormalizeIntensity(nonzero, channel_wise), RandScaleIntensity 0.1, RandShiftIntensity 0.1."""
    patch = list(patch_size)
    return Compose(
        _brats_load()
        + [
            CropForegroundd(keys=KEYS, source_key="image", k_divisible=patch, start_coord_key=None, end_coord_key=None),
            RandSpatialCropd(keys=KEYS, roi_size=patch, random_size=False),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
        + _final(torch.float32)
    )


def brats_eval_transforms() -> Compose:
    """Load, regions, NormalizeIntensity(nonzero, channel_wise); whole volume, no crop.

    (The released SegResMamba code also random-cropped its validation cases; this suite scores whole
    volumes, see paper-spec §2.2.)
    """
    return Compose(_brats_load() + [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)] + _final(torch.float32))


# -- CT recipes (BTCV, MSD Spleen: MONAI UNETR/SwinUNETR BTCV and spleen tutorials) -------------------


def _ct_preprocess(
    spacing: Sequence[float] | None,
    intensity_window: Sequence[float] | None,
    crop_foreground: bool,
) -> list:
    chain: list = [
        LoadImaged(keys=KEYS, image_only=True),
        EnsureChannelFirstd(keys=KEYS),  # 4D (X, Y, Z, C) Decathlon images become (C, X, Y, Z)
        Orientationd(keys=KEYS, axcodes="RAS", labels=RAS_LABELS),
    ]
    if spacing is not None:
        chain.append(Spacingd(keys=KEYS, pixdim=tuple(spacing), mode=("bilinear", "nearest")))
    if intensity_window is not None:
        a_min, a_max = intensity_window
        chain.append(ScaleIntensityRanged(keys="image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    if crop_foreground:
        # foreground = voxels above the window's lower bound (the body, for CT), or nonzero (MR)
        chain.append(CropForegroundd(keys=KEYS, source_key="image", start_coord_key=None, end_coord_key=None))
    if intensity_window is None:
        chain.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    return chain


def patch_augmentations(
    patch_size: Sequence[int], num_samples: int, flip_prob: float = 0.1, image_key: str | None = "image"
) -> list:
    """Pad to the patch, RandCropByPosNegLabel (pos 1, neg 1, ``num_samples`` patches per volume), flips
    on 3 axes and rot90 with p=0.1, RandShiftIntensity 0.1 with p=0.5 (MONAI BTCV tutorial).

    With ``image_key`` set, background patch centres are drawn only where that image is > 0 (inside the
    body for windowed CT); ``None`` allows any background voxel.

    rot90 turns the first two spatial axes; it is left out when those patch sides differ, since it would
    change the patch shape and break batching.
    """
    patch = list(patch_size)
    chain: list = [
        SpatialPadd(keys=KEYS, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys=KEYS, label_key="label", spatial_size=patch, pos=1, neg=1, num_samples=num_samples,
            image_key=image_key, image_threshold=0,
        ),
        RandFlipd(keys=KEYS, prob=flip_prob, spatial_axis=0),
        RandFlipd(keys=KEYS, prob=flip_prob, spatial_axis=1),
        RandFlipd(keys=KEYS, prob=flip_prob, spatial_axis=2),
    ]
    if patch[0] == patch[1]:
        chain.append(RandRotate90d(keys=KEYS, prob=flip_prob, max_k=3))
    chain.append(RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5))
    return chain


def ct_train_transforms(
    patch_size: Sequence[int],
    spacing: Sequence[float] | None,
    intensity_window: Sequence[float] | None,
    num_samples: int,
) -> Compose:
    """Load, channel first, RAS, Spacing (bilinear image / nearest label), intensity window -> [0, 1]
    with clipping (or z-score inside the nonzero region when no window is given), CropForeground, then
    :func:`patch_augmentations`. Each volume yields ``num_samples`` patches (a list), which MONAI's
    DataLoader collate flattens: a batch holds ``batch_size * num_samples`` patches."""
    return Compose(
        _ct_preprocess(spacing, intensity_window, crop_foreground=True)
        + patch_augmentations(patch_size, num_samples)
        + _final(torch.int64)
    )


def ct_eval_transforms(spacing: Sequence[float] | None, intensity_window: Sequence[float] | None) -> Compose:
    """The deterministic part of :func:`ct_train_transforms` without any crop: the whole resampled
    volume (Dice is computed on the resampled grid, as in the MONAI tutorials)."""
    return Compose(_ct_preprocess(spacing, intensity_window, crop_foreground=False) + _final(torch.int64))
