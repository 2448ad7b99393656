"""A real, embedded, offline dataset: tissue classes of the MNI152 2009 template (Fonov et al. 2011,
"Unbiased average age-appropriate atlases for pediatric studies", NeuroImage 54:313-327), as shipped inside
nilearn (``nilearn.datasets.load_mni152_template`` and friends; no download)."""

from __future__ import annotations

import functools
from typing import Literal

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, NormalizeIntensityd

from segresmamba.data.base import VolumeDataModule
from segresmamba.data.external import external_eval_transforms
from segresmamba.data.plan import fingerprint_cases, make_plan
from segresmamba.data.transforms import patch_augmentations, plan_normalization
from segresmamba.errors import InputError
from segresmamba.recipes.augment import nnunet_augmentations

__all__ = ["MNI152TissueDataModule", "mni152_tissue_volumes"]

_AXIS_CODES = {"anterior-posterior": ("A", "P"), "superior-inferior": ("S", "I")}


def mni152_tissue_volumes(resolution: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of :func:`_load_tissue_volumes` (loaded once per resolution and process)."""
    image, label, affine = _load_tissue_volumes(resolution)
    return image.copy(), label.copy(), affine.copy()


@functools.lru_cache(maxsize=2)
def _load_tissue_volumes(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 T1 template and its 4-class tissue labels, from nilearn's bundled files.

    Labels: 0 background (outside the brain mask); inside the mask, 1 + argmax of
    ``(1 - gm - wm, gm, wm)`` over nilearn's grey- and white-matter probability templates: 1 CSF/other,
    2 grey matter, 3 white matter.

    Returns:
        image: (X, Y, Z) float32 T1 template intensities (nilearn's 0..1 scale).
        label: (X, Y, Z) uint8 in {0, 1, 2, 3}.
        affine: (4, 4) voxel-to-MNI-mm affine (RAS+).
    """
    if resolution < 1:
        raise InputError(f"resolution must be a positive number of mm, got {resolution}")
    from nilearn import datasets  # imported here: nilearn is only needed for this dataset

    template = datasets.load_mni152_template(resolution=resolution)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=resolution).get_fdata(), dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).get_fdata()) > 0.5
    image = np.asarray(template.get_fdata(), dtype=np.float32)
    if not (image.shape == gm.shape == wm.shape == mask.shape):
        raise InputError(
            f"nilearn MNI152 templates disagree in shape at resolution {resolution}: "
            f"T1 {image.shape}, GM {gm.shape}, WM {wm.shape}, mask {mask.shape}"
        )
    gm, wm = np.clip(gm, 0.0, 1.0), np.clip(wm, 0.0, 1.0)
    probs = np.stack([np.clip(1.0 - gm - wm, 0.0, 1.0), gm, wm])
    label = np.zeros(image.shape, dtype=np.uint8)
    label[mask] = (np.argmax(probs[:, mask], axis=0) + 1).astype(np.uint8)
    return image, label, np.asarray(template.affine)


class MNI152TissueDataModule(VolumeDataModule):
    """Brain tissue segmentation on the MNI152 2009 T1 template: a real MRI template, one subject.

    One T1 volume (an average of 152 registered adult brains, MNI152 2009, Fonov et al. 2011) with four
    classes: 0 background outside nilearn's brain mask, 1 CSF/other, 2 grey matter (GM), 3 white matter
    (WM), from the argmax of ``(1 - gm - wm, gm, wm)`` inside the mask (:func:`mni152_tissue_volumes`).
    Task "multiclass", 1 input channel, 4 output channels, scored classes CSF/other, GM, WM. Everything is
    bundled with nilearn, so this dataset works offline; results from it are "real" but come from a single
    template, not a patient cohort.

    Split: the template is left-right symmetric, so it is never split by hemisphere (the two halves are
    near mirror copies and would leak). Instead the brain's extent along ``axis`` (anterior-posterior or
    superior-inferior) is cut into ``num_blocks`` contiguous slabs of equal thickness (the first and last
    slabs also take the background beyond the brain). Slab ``fold`` is the validation volume (whole, scored
    by sliding window); the slabs on either side of it, minus ``margin`` voxels next to it, are the
    training volumes, so no training patch touches a validation voxel or its immediate neighbours.
    There is no separate labelled test set: the test split is the validation slab.

    Intensities are z-scored with the mean and standard deviation of the training slabs' brain voxels.
    Training draws ``num_samples`` RandCropByPosNegLabel patches (brain : background = 1 : 1) per item
    from ``train_items`` items per epoch (cycling over the training slabs, padded to the patch when
    thinner), with flips/rot90 p=0.1 and RandShiftIntensity 0.1. With ``recipe: nnunet`` the slabs keep
    the template's intensities and each is z-scored by the plan (:meth:`make_plan`), then augmented as
    nnU-Net (:func:`~segresmamba.recipes.augment.nnunet_augmentations`).

    Args:
        resolution: voxel size in mm of the template (2: 99x117x95 voxels; 1: 197x233x189).
        axis: "anterior-posterior" or "superior-inferior": the axis along which slabs are cut.
        num_blocks: number of slabs; ``fold`` is within [0, num_blocks).
        fold: the validation slab.
        margin: voxels of the training slabs dropped next to the validation slab.
        train_items: training items per epoch (each gives ``num_samples`` patches).
        num_samples: patches per item.
        kwargs: ``patch_size`` (default 64 at 2 mm; 96 or 128 at 1 mm on a GPU), ``batch_size``,
            ``num_workers``, ``cache_rate``, ``test_dir``, ``recipe``, ``iterations_per_epoch``: see
            :class:`~segresmamba.data.base.VolumeDataModule`; scans in ``test_dir`` are resampled to ``resolution`` mm and normalised as the training slabs
            (:meth:`intensity_normalisation`).
    """

    in_channels = 1
    out_channels = 4
    task = "multiclass"
    class_names = ["CSF/other", "GM", "WM"]
    provenance = "real"
    name = "mni152_tissue"
    default_patch_size = 64

    def __init__(
        self,
        resolution: int = 2,
        axis: Literal["anterior-posterior", "superior-inferior"] = "anterior-posterior",
        num_blocks: int = 4,
        fold: int = 0,
        margin: int = 4,
        train_items: int = 8,
        num_samples: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if axis not in _AXIS_CODES:
            raise InputError(f"axis must be 'anterior-posterior' or 'superior-inferior' (never left-right), got {axis!r}")
        if num_blocks < 2:
            raise InputError(f"num_blocks must be >= 2, got {num_blocks}")
        if not 0 <= fold < num_blocks:
            raise InputError(f"fold must be within [0, {num_blocks - 1}], got {fold}")
        if margin < 0:
            raise InputError(f"margin must be >= 0, got {margin}")
        if train_items < 1 or num_samples < 1:
            raise InputError(f"train_items and num_samples must be >= 1, got {train_items} and {num_samples}")
        if resolution < 1:
            raise InputError(f"resolution must be a positive number of mm, got {resolution}")
        self.resolution = resolution
        self.axis = axis
        self.num_blocks = num_blocks
        self.fold = fold
        self.margin = margin
        self.train_items = train_items
        self.num_samples = num_samples
        self._blocks: dict[str, list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]] | None = None
        self.brain_intensity: tuple[float, float] | None = None  # (mean, std) of the training slabs' brain voxels

    # -- the volume and its slabs ------------------------------------------------------------------
    def _array_axis(self, affine: np.ndarray) -> int:
        codes = nib.aff2axcodes(affine)
        wanted = _AXIS_CODES[self.axis]
        for i, code in enumerate(codes):
            if code in wanted:
                return i
        raise InputError(f"cannot find the {self.axis} axis in the template orientation {codes}")

    def slab_bounds(self, label: np.ndarray, axis: int) -> list[tuple[int, int]]:
        """[start, stop) of each slab along ``axis``: equal cuts of the brain's extent; the outer slabs
        extend to the volume border."""
        others = tuple(a for a in range(label.ndim) if a != axis)
        inside = np.flatnonzero((label > 0).any(axis=others))
        lo, hi = int(inside[0]), int(inside[-1]) + 1
        cuts = [lo + round(i * (hi - lo) / self.num_blocks) for i in range(self.num_blocks + 1)]
        cuts[0], cuts[-1] = 0, label.shape[axis]
        return [(cuts[i], cuts[i + 1]) for i in range(self.num_blocks)]

    def _build(self) -> dict[str, list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]]:
        if self._blocks is not None:
            return self._blocks
        image, label, affine = mni152_tissue_volumes(self.resolution)
        axis = self._array_axis(affine)
        bounds = self.slab_bounds(label, axis)
        v0, v1 = bounds[self.fold]
        train_ranges = [(0, v0 - self.margin), (v1 + self.margin, label.shape[axis])]
        train_ranges = [(a, b) for a, b in train_ranges if b - a >= 4]
        if not train_ranges:
            raise InputError(f"{self.name}: no training slab left (num_blocks={self.num_blocks}, margin={self.margin})")

        def take(arr: np.ndarray, a: int, b: int) -> np.ndarray:
            index = [slice(None)] * arr.ndim
            index[axis] = slice(a, b)
            return np.ascontiguousarray(arr[tuple(index)])

        brain = np.concatenate([take(image, a, b)[take(label, a, b) > 0] for a, b in train_ranges])
        self.brain_intensity = (float(brain.mean()), float(brain.std()) or 1.0)
        if self.uses_plan:  # slabs keep the template's intensities; the chains normalise each one
            norm = image
        else:
            norm = np.asarray(Compose(self.intensity_normalisation())({"image": image})["image"], dtype=np.float32)
        self.axis_index = axis
        self.template_affine = affine
        self.slabs = {"val": (v0, v1), "train": train_ranges, "all": bounds}
        self._blocks = {
            "train": [(take(norm, a, b)[None], take(label, a, b)[None].astype(np.int64), (a, b)) for a, b in train_ranges],
            "val": [(take(norm, v0, v1)[None], take(label, v0, v1)[None].astype(np.int64), (v0, v1))],
        }
        return self._blocks

    # -- VolumeDataModule --------------------------------------------------------------------------
    def items(self, split: Literal["train", "val", "test"]) -> list[dict]:
        blocks = self._build()
        if split == "train":
            pieces = blocks["train"]
            return [
                {"image": pieces[i % len(pieces)][0], "label": pieces[i % len(pieces)][1],
                 "case_id": f"mni152_train_{pieces[i % len(pieces)][2][0]}-{pieces[i % len(pieces)][2][1]}"}
                for i in range(self.train_items)
            ]
        image, label, (a, b) = blocks["val"][0]
        # the held-out slab keeps its place in MNI space, so distances (HD95) come out in mm
        affine = self.slab_affine(a)
        return [{"image": MetaTensor(image, affine=affine), "label": MetaTensor(label, affine=affine), "case_id": f"mni152_val_{a}-{b}"}]

    def slab_affine(self, start: int) -> np.ndarray:
        """Voxel-to-MNI-mm affine of a slab that starts at voxel ``start`` of the template along the split axis."""
        self._build()
        shift = np.eye(4)
        shift[self.axis_index, 3] = start
        return self.template_affine @ shift

    def validate(self) -> dict:
        """Load the bundled templates (offline) and build the slabs; return a summary."""
        blocks = self._build()
        return {
            **self.describe(),
            "num_train": self.train_items,
            "num_val": 1,
            "num_test": 1,
            "test_is_val": True,
            "train_slabs": [list(r) for r in self.slabs["train"]],
            "val_slab": list(self.slabs["val"]),
            "val_shape": list(blocks["val"][0][0].shape[1:]),
        }

    def setup(self, stage: str | None = None) -> None:
        self._build()

    def describe(self) -> dict:
        facts = super().describe()
        facts.update(resolution_mm=self.resolution, split_axis=self.axis, num_blocks=self.num_blocks, fold=self.fold)
        return facts

    def make_plan(self) -> dict:
        """The plan of the training slabs (at ``resolution`` mm, one MR channel): per-slab z-score, over
        the nonzero voxels only if that crop shrinks a slab by a quarter. The slabs are on the template's
        grid already: the target spacing is recorded, nothing is resampled."""
        pieces = self._build()["train"]
        spacing = [float(self.resolution)] * 3
        fingerprint = fingerprint_cases(lambda i: (pieces[i][0], pieces[i][1], spacing), len(pieces))
        return {**make_plan(fingerprint, ["MR"]), "source": "training slabs"}

    def train_transforms(self) -> Compose:
        if self.uses_plan:
            return Compose(
                [EnsureTyped(keys=["image", "label"], track_meta=False)]
                + plan_normalization(self.plan["normalization"])
                + nnunet_augmentations(self.patch_size, self.num_samples, self.recipe_settings.foreground_oversampling or 0.0)
                + self._final()
            )
        return Compose(
            [EnsureTyped(keys=["image", "label"], track_meta=False)]
            + patch_augmentations(self.patch_size, self.num_samples, image_key=None)  # z-scored: no > 0 test
            + self._final()
        )

    def intensity_normalisation(self) -> list:
        """The intensity normalisation of training, as MONAI transforms on ``image``: z-score with the mean
        and standard deviation of the training slabs' brain voxels (applied to the whole template, and to
        external test scans in :meth:`external_eval_transforms`)."""
        if self.uses_plan:
            return plan_normalization(self.plan["normalization"])
        if self.brain_intensity is None:
            self._build()
        mean, std = self.brain_intensity
        return [NormalizeIntensityd(keys="image", subtrahend=mean, divisor=std)]

    def external_eval_transforms(self) -> Compose:
        return external_eval_transforms((float(self.resolution),) * 3, self.intensity_normalisation())

    def eval_transforms(self) -> Compose:
        # MetaTensors to the end: the slab's affine gives HD95 its voxel size in mm
        typed = [
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=True),
            EnsureTyped(keys="label", dtype=torch.int64, track_meta=True),
        ]
        if self.uses_plan:
            return Compose(self.intensity_normalisation() + typed)
        return Compose(typed)

    @staticmethod
    def _final() -> list:
        return [
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            EnsureTyped(keys="label", dtype=torch.int64, track_meta=False),
        ]
