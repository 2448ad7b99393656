"""The recipes' preprocessing and augmentation, as MONAI transform chains.

The ``paper`` recipe's chains are ``brats_*``, ``ct_*`` and :func:`patch_augmentations`; the ``nnunet``
recipe's are ``planned_*``: the preprocessing of a dataset plan (:mod:`segresmamba.data.plan`) followed by
:func:`segresmamba.recipes.augment.nnunet_augmentations`.

Training chains end in random patches; evaluation chains are deterministic and keep the whole volume
(no crop), which the task scores by sliding-window inference. Images end float32; labels float32 0/1
regions (multilabel) or int64 class indices (multiclass). Training chains end in plain tensors
(``track_meta=False``). Evaluation chains end in MONAI MetaTensors that keep their affine and the record
of the spatial transforms applied to them, so that MONAI ``Invertd`` can map a prediction back onto the
scan's own grid; they also carry the label as stored on disk (:data:`ORIGINAL_LABEL`), converted like the
label but never resampled, which predictions are scored against in the original image space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    ConcatItemsd,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CopyItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    InvertibleTransform,
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
    SplitDimd,
)

from segresmamba.recipes.augment import nnunet_augmentations

KEYS = ["image", "label"]
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # the NIfTI world axes, stated to pin MONAI's default

ORIGINAL_LABEL = "original_label"
"""Key of the label as stored on disk in evaluation items: loaded, channel first, label conversion
applied (e.g. BraTS regions), before any spatial transform. (Not ``label_*``: MONAI's spatial transforms
take keys starting with ``<key>_`` for that key's metadata dictionaries.)"""

__all__ = [
    "ORIGINAL_LABEL",
    "brats_train_transforms",
    "brats_eval_transforms",
    "ct_train_transforms",
    "ct_eval_transforms",
    "patch_augmentations",
    "plan_normalization",
    "planned_preprocessing",
    "planned_train_transforms",
    "whole_volume_eval_transforms",
    "load_channel_first",
    "to_ras",
]


def _final(label_dtype: torch.dtype, invertible: bool = False) -> list:
    """Typing at the end of a chain: plain tensors, or (``invertible``, evaluation chains) MetaTensors
    keeping their affine and applied transforms, with the stored label typed like the label."""
    labels = ["label", ORIGINAL_LABEL] if invertible else ["label"]
    return [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=invertible),
        EnsureTyped(keys=labels, dtype=label_dtype, track_meta=invertible),
    ]


def load_channel_first() -> list:
    """Load image and label channel first: 4D (X, Y, Z, C) Decathlon images become (C, X, Y, Z), a list of
    channel files is stacked in the listed order."""
    return [LoadImaged(keys=KEYS, image_only=True), EnsureChannelFirstd(keys=KEYS)]


def to_ras(spacing: Sequence[float] | None) -> list:
    """RAS orientation, then resampling to ``spacing`` mm (image bilinear, label nearest; ``None`` keeps each
    case's grid)."""
    chain: list = [Orientationd(keys=KEYS, axcodes="RAS", labels=RAS_LABELS)]
    if spacing is not None:
        chain.append(Spacingd(keys=KEYS, pixdim=tuple(float(s) for s in spacing), mode=("bilinear", "nearest")))
    return chain


def _keep_stored_label(chain: list) -> list:
    """``chain`` with the label copied to :data:`ORIGINAL_LABEL` right after it is loaded channel first
    (and converted, where the chain converts it there), before the first invertible (spatial) transform."""
    at = next((i for i, t in enumerate(chain) if isinstance(t, InvertibleTransform)), len(chain))
    return chain[:at] + [CopyItemsd(keys="label", names=ORIGINAL_LABEL)] + chain[at:]


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
    chain = _brats_load() + [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
    return Compose(_keep_stored_label(chain) + _final(torch.float32, invertible=True))


# -- CT recipes (BTCV, MSD Spleen: MONAI UNETR/SwinUNETR BTCV and spleen tutorials) -------------------


def _ct_preprocess(
    spacing: Sequence[float] | None,
    intensity_window: Sequence[float] | None,
    crop_foreground: bool,
) -> list:
    chain = load_channel_first() + to_ras(spacing)
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
    body for windowed CT, whose window maps air to 0); ``None`` allows any background voxel. A z-scored
    image must use ``None``: there "> 0" means "brighter than the mean", which leaves out air.

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
    DataLoader collate flattens: a batch holds ``batch_size * num_samples`` patches.

    Background patch centres: inside the body (image > 0 after the window) for windowed CT; anywhere for a
    z-scored image (no window). Before, z-scored MR also asked for image > 0, i.e. above the mean, so air
    was never a patch centre although evaluation scores it."""
    return Compose(
        _ct_preprocess(spacing, intensity_window, crop_foreground=True)
        + patch_augmentations(patch_size, num_samples, image_key="image" if intensity_window is not None else None)
        + _final(torch.int64)
    )


def ct_eval_transforms(spacing: Sequence[float] | None, intensity_window: Sequence[float] | None) -> Compose:
    """The deterministic part of :func:`ct_train_transforms` without any crop: the whole resampled
    volume, invertible, with the stored label (:data:`ORIGINAL_LABEL`) beside it."""
    chain = _ct_preprocess(spacing, intensity_window, crop_foreground=False)
    return Compose(_keep_stored_label(chain) + _final(torch.int64, invertible=True))


# -- planned preprocessing (the nnunet recipe: segresmamba.data.plan) ------------------------------------


def _normalize_channels(entry: dict, key: str) -> list:
    scheme = entry.get("scheme")
    if scheme == "ct":
        # clip to the foreground percentiles, then z-score with the foreground statistics, in one linear map
        (low, high), mean, std = entry["clip"], float(entry["mean"]), float(entry["std"])
        return [
            ScaleIntensityRanged(
                keys=key, a_min=low, a_max=high, b_min=(low - mean) / std, b_max=(high - mean) / std, clip=True
            )
        ]
    if scheme == "zscore":
        return [NormalizeIntensityd(keys=key, nonzero=bool(entry["use_nonzero_mask"]), channel_wise=True)]
    if scheme == "window":
        low, high = entry["window"]
        return [ScaleIntensityRanged(keys=key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)]
    raise ValueError(f"unknown normalisation scheme {scheme!r} in a plan; expected 'ct', 'zscore' or 'window'")


def plan_normalization(normalization: Sequence[dict]) -> list:
    """MONAI transforms normalising ``image`` channel by channel as a plan says (one entry per channel):

    - ``{"scheme": "ct", "clip": [low, high], "mean": m, "std": s}``: clip to [low, high], then
      ``(x - m) / s`` (nnU-Net's CTNormalization, with dataset-wide foreground statistics);
    - ``{"scheme": "zscore", "use_nonzero_mask": bool}``: per-image z-score, over the nonzero voxels only
      when the mask is used (outside voxels stay 0) (nnU-Net's ZScoreNormalization);
    - ``{"scheme": "window", "window": [low, high]}``: [low, high] -> [0, 1] clipped (an explicit
      ``intensity_window`` setting, which overrides the plan).

    Channels that share one z-score or window entry are normalised together; otherwise each channel is split
    off, normalised and concatenated back (MONAI ``SplitDimd`` / ``ConcatItemsd``).
    """
    entries = list(normalization)
    if not entries:
        raise ValueError("a plan's normalization needs one entry per image channel, got none")
    if len(entries) == 1 or (entries[0]["scheme"] != "ct" and all(e == entries[0] for e in entries)):
        return _normalize_channels(entries[0], "image")
    parts = [f"image_{i}" for i in range(len(entries))]  # SplitDimd's names for the channels
    chain: list = [SplitDimd(keys="image", dim=0, keepdim=True)]
    for entry, part in zip(entries, parts):
        chain += _normalize_channels(entry, part)
    return chain + [ConcatItemsd(keys=parts, name="image", dim=0), DeleteItemsd(keys=parts)]


def planned_preprocessing(
    spacing: Sequence[float] | None, normalization: Sequence[dict], brats_channels: bool = False
) -> list:
    """Load, channel first (BraTS: the four channel files stacked, labels -> [TC, WT, ET] regions), RAS,
    Spacing to the plan's target spacing (bilinear image / nearest label; ``None`` keeps each case's grid),
    then :func:`plan_normalization`. No crop: the whole volume, air included, is what evaluation scores."""
    load = _brats_load() if brats_channels else load_channel_first()
    return load + to_ras(spacing) + plan_normalization(normalization)


def planned_train_transforms(
    preprocessing: list, patch_size: Sequence[int], num_samples: int, foreground_fraction: float, label_dtype: torch.dtype
) -> Compose:
    """``preprocessing`` (e.g. :func:`planned_preprocessing`), then nnU-Net's augmentation
    (:func:`~segresmamba.recipes.augment.nnunet_augmentations`): ``num_samples`` patches per volume."""
    return Compose(
        list(preprocessing) + nnunet_augmentations(patch_size, num_samples, foreground_fraction) + _final(label_dtype)
    )


def whole_volume_eval_transforms(preprocessing: list, label_dtype: torch.dtype) -> Compose:
    """``preprocessing`` on the whole volume, invertible, with the stored label beside it (as the other
    evaluation chains): for the planned chains and for external test scans."""
    return Compose(_keep_stored_label(list(preprocessing)) + _final(label_dtype, invertible=True))
