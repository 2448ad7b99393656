"""In-memory synthetic BraTS-like data: the default for a first `segresmamba fit` with nothing on disk."""

from __future__ import annotations

from typing import Literal

import numpy as np
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    EnsureTyped,
    NormalizeIntensityd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
)

from segresmamba.data.base import VolumeDataModule
from segresmamba.data.phantoms import brats_like
from segresmamba.data.plan import fingerprint_cases, make_plan
from segresmamba.data.transforms import plan_normalization
from segresmamba.recipes.augment import nnunet_augmentations


class SyntheticBraTSDataModule(VolumeDataModule):
    """BraTS-like phantoms generated in memory (4 MR-like channels -> TC, WT, ET regions).

    Same label conventions and the paper's BraTS training transforms (random crop, flips, channel-wise
    nonzero normalisation, intensity scale and shift), so every model meets the same task as on real
    BraTS, just smaller. Results on it are labelled "synthetic". With ``recipe: nnunet``: the plan's
    per-image z-score (:meth:`make_plan`) and nnU-Net's augmentation, one patch per volume.

    Args:
        volume_size: side of each cubic phantom volume.
        num_train, num_val, num_test: number of phantoms per split (disjoint seeds).
        seed: base seed; the same seed gives the same volumes on any machine.
        kwargs: ``patch_size`` (default 32), ``batch_size``, ``num_workers``, ``cache_rate``, ``recipe``,
            ``iterations_per_epoch``: see :class:`VolumeDataModule`.
    """

    in_channels = 4
    out_channels = 3
    task = "multilabel"
    class_names = ["TC", "WT", "ET"]
    provenance = "synthetic"
    name = "brats_synthetic"
    default_patch_size = 32

    def __init__(
        self,
        volume_size: int = 48,
        num_train: int = 8,
        num_val: int = 2,
        num_test: int = 2,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if min(num_train, num_val, num_test) < 1:
            raise ValueError("num_train, num_val and num_test must each be >= 1")
        if any(p > volume_size for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} is larger than volume_size {volume_size}")
        self.volume_size = volume_size
        self.counts = {"train": num_train, "val": num_val, "test": num_test}
        self.seed = seed

    def items(self, split: Literal["train", "val", "test"]) -> list[dict]:
        offset = {"train": 0, "val": 10_000, "test": 20_000}[split]
        out = []
        for i in range(self.counts[split]):
            image, seg = brats_like(self.volume_size, seed=self.seed * 100_003 + offset + i)
            out.append({"image": image, "label": seg[None].astype(np.int64), "case_id": f"{split}{i:03d}"})
        return out

    def _base(self) -> list:
        return [
            EnsureTyped(keys=["image", "label"], track_meta=False),
            ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        ]

    def make_plan(self) -> dict:
        """The plan of the training phantoms (1 mm voxels, four MR channels); arrays are not resampled."""
        items = self.items("train")
        fingerprint = fingerprint_cases(lambda i: (items[i]["image"], items[i]["label"], (1.0, 1.0, 1.0)), len(items))
        return {**make_plan(fingerprint, ["MR"] * self.in_channels), "source": "training phantoms"}

    def train_transforms(self) -> Compose:
        if self.uses_plan:
            return Compose(
                self._base()
                + plan_normalization(self.plan["normalization"])
                + nnunet_augmentations(self.patch_size, 1, self.recipe_settings.foreground_oversampling or 0.0)
                + [EnsureTyped(keys=["image", "label"], dtype="float32", track_meta=False)]
            )
        return Compose(
            self._base()
            + [
                RandSpatialCropd(keys=["image", "label"], roi_size=self.patch_size, random_size=False),
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
                NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
                RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
                EnsureTyped(keys=["image", "label"], dtype="float32", track_meta=False),
            ]
        )

    def eval_transforms(self) -> Compose:
        normalization = (
            plan_normalization(self.plan["normalization"]) if self.uses_plan
            else [NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)]
        )
        return Compose(
            self._base()
            + normalization
            + [
                EnsureTyped(keys=["image", "label"], dtype="float32", track_meta=False),
            ]
        )
