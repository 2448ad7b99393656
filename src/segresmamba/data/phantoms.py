"""Deterministic synthetic phantoms that look enough like the real data to exercise the whole pipeline.

They are test fixtures and the embedded default data; every result computed on them is labelled
"synthetic". Nothing here claims anatomical realism.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BRATS_CHANNELS = ("flair", "t1", "t1ce", "t2")
"""Channel order of BraTS images everywhere in the suite (the order of the BraTS file suffixes used by
MONAI's SwinUNETR BraTS21 recipe)."""


def _grid(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.meshgrid(*axes, indexing="ij")  # type: ignore[return-value]


def _ellipsoid(grids, centre, radii) -> np.ndarray:
    """Normalised ellipsoid distance: < 1 inside."""
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))


def _smooth_field(rng: np.random.Generator, grids, strength: float) -> np.ndarray:
    """Low-order polynomial field, used as a multiplicative MR bias field."""
    z, y, x = grids
    coeffs = rng.normal(0.0, strength, size=6)
    return 1.0 + coeffs[0] * z + coeffs[1] * y + coeffs[2] * x + coeffs[3] * z * y + coeffs[4] * y * x + coeffs[5] * x * x


def brats_like(shape: int | Sequence[int] = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-shaped volume with a nested tumour, in BraTS conventions.

    Returns:
        image: (4, D, H, W) float32 in :data:`BRATS_CHANNELS` order (FLAIR, T1, T1ce, T2).
        seg: (D, H, W) uint8 with BraTS labels 0 background, 1 necrotic core, 2 edema, 4 enhancing
            tumour (no label 3): edema surrounds an enhancing rim that surrounds necrosis.
    """
    shape = (shape,) * 3 if isinstance(shape, int) else tuple(shape)
    rng = np.random.default_rng(seed)
    grids = _grid(shape)
    brain_radii = rng.uniform(0.72, 0.88, size=3)
    brain = _ellipsoid(grids, (0.0, 0.0, 0.0), brain_radii) < 1.0
    # white/grey-matter-like texture: a smooth inner ellipsoid of higher T1 signal
    inner = _ellipsoid(grids, (0.0, 0.0, 0.0), brain_radii * 0.7) < 1.0

    centre = rng.uniform(-0.3, 0.3, size=3)
    r_edema = rng.uniform(0.28, 0.38)
    r_core = r_edema * rng.uniform(0.45, 0.6)
    r_necrosis = r_core * rng.uniform(0.35, 0.6)
    squash = rng.uniform(0.8, 1.2, size=3)
    dist = np.sqrt(_ellipsoid(grids, centre, squash))
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(dist < r_edema) & brain] = 2
    seg[(dist < r_core) & brain] = 4
    seg[(dist < r_necrosis) & brain] = 1

    # mean intensity per tissue and contrast: [background, brain, inner, necrosis, edema, enhancing]
    table = {
        "flair": (0.0, 0.45, 0.40, 0.55, 0.95, 0.70),
        "t1": (0.0, 0.55, 0.70, 0.20, 0.40, 0.45),
        "t1ce": (0.0, 0.50, 0.62, 0.25, 0.45, 1.00),
        "t2": (0.0, 0.50, 0.40, 0.95, 0.85, 0.60),
    }
    channels = []
    for name in BRATS_CHANNELS:
        bg, br, inn, nec, ede, enh = table[name]
        vol = np.full(shape, bg, dtype=np.float32)
        vol[brain] = br
        vol[inner & brain] = inn
        vol[seg == 2] = ede
        vol[seg == 4] = enh
        vol[seg == 1] = nec
        vol *= _smooth_field(rng, grids, 0.08).astype(np.float32)
        vol += rng.normal(0.0, 0.04, size=shape).astype(np.float32) * brain
        vol = np.clip(vol, 0.0, None) * brain  # skull-stripped: zero outside the brain
        channels.append(vol * 1000.0)  # MR-like arbitrary units
    return np.stack(channels).astype(np.float32), seg


# -- CT-like abdominal phantoms (BTCV, MSD Spleen) ------------------------------------------------------

BTCV_ORGANS = (
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal and splenic veins",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
"""The 13 BTCV abdominal organs in label order (label ``i + 1`` is ``BTCV_ORGANS[i]``; 0 is background)."""

CT_SPACING = (0.8, 0.8, 2.5)
"""Voxel size (mm) of the CT-like phantoms: fine in-plane, thick slices, as in abdominal CT, so that the
paper's ``Spacingd(1.5, 1.5, 2.0)`` really resamples them."""

PHANTOM_MARKER = "PHANTOM.json"
"""File the phantom writers drop at the dataset root; adapters that find it report provenance "synthetic"."""

# Organ layout in normalised RAS+ coordinates (x to the patient's right, y anterior, z superior; the body
# spans [-1, 1] on each axis): centre, radii, mean HU (portal-venous contrast CT, roughly). The order is
# the painting order: large organs first so that small ones drawn later are never hidden.
_ABDOMEN = {
    "liver": ((0.42, 0.05, 0.35), (0.36, 0.42, 0.40), 100.0),
    "spleen": ((-0.55, -0.22, 0.35), (0.15, 0.20, 0.25), 110.0),
    "stomach": ((-0.30, 0.22, 0.30), (0.20, 0.20, 0.25), 30.0),
    "right kidney": ((0.40, -0.40, -0.15), (0.12, 0.13, 0.25), 160.0),
    "left kidney": ((-0.40, -0.40, -0.20), (0.12, 0.13, 0.25), 160.0),
    "pancreas": ((-0.05, -0.08, -0.05), (0.30, 0.07, 0.08), 90.0),
    "portal and splenic veins": ((0.05, -0.02, 0.10), (0.26, 0.045, 0.05), 150.0),
    "aorta": ((-0.08, -0.36, 0.0), (0.065, 0.065, 1.5), 190.0),
    "inferior vena cava": ((0.14, -0.30, 0.0), (0.065, 0.065, 1.5), 125.0),
    "esophagus": ((-0.04, -0.26, 0.65), (0.05, 0.05, 0.40), 45.0),
    "gallbladder": ((0.30, 0.28, -0.05), (0.08, 0.08, 0.12), 10.0),
    "right adrenal gland": ((0.28, -0.45, 0.30), (0.05, 0.05, 0.08), 40.0),
    "left adrenal gland": ((-0.28, -0.45, 0.28), (0.05, 0.05, 0.08), 40.0),
}

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT_TISSUE = 40.0
HU_BONE = 450.0


def ct_phantom_shape(size: int) -> tuple[int, int, int]:
    """Array shape of a CT-like phantom whose in-plane side is ``size`` voxels at :data:`CT_SPACING`
    (fewer, thicker slices along z, about as tall as wide in millimetres)."""
    if size < 8:
        raise ValueError(f"phantom size must be >= 8 voxels, got {size}")
    return (size, size, max(8, round(size * CT_SPACING[0] / CT_SPACING[2] * 1.25)))


def _body(grids, rng: np.random.Generator):
    """Torso cross-section: an elliptic cylinder along z with a subcutaneous fat layer and a spine."""
    x, y, _ = grids
    rx, ry = rng.uniform(0.86, 0.94), rng.uniform(0.70, 0.80)
    body = (x / rx) ** 2 + (y / ry) ** 2 < 1.0
    fat_depth = rng.uniform(0.08, 0.14)
    inner = (x / (rx - fat_depth)) ** 2 + (y / (ry - fat_depth)) ** 2 < 1.0
    spine = (x / 0.11) ** 2 + ((y + 0.58 * ry) / 0.11) ** 2 < 1.0
    return body, inner, spine


def _min_radii(radii, shape) -> np.ndarray:
    """Radii no smaller than 1.5 voxels, so that small organs survive on small phantoms."""
    return np.maximum(np.asarray(radii, dtype=np.float32), np.array([3.0 / n for n in shape], dtype=np.float32))


def btcv_like(
    size: int = 64, seed: int = 0, missing_gallbladder_prob: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """An abdominal CT-like volume with the 13 BTCV organs, in Hounsfield units.

    Air (-1000 HU) outside the body, a subcutaneous fat layer (-100 HU), soft tissue (40 HU), a vertebral
    column (bone, unlabelled) and 13 ellipsoidal organs at plausible places, each with its own mean HU,
    per-case jitter of position, size and HU, and Gaussian noise (10 HU). The gallbladder is missing
    (cholecystectomy-like) with probability ``missing_gallbladder_prob``, as happens in real BTCV cases.

    Returns:
        image: (X, Y, Z) float32 HU in RAS+ voxel order (shape from :func:`ct_phantom_shape`).
        label: (X, Y, Z) uint8, 0 background and ``i + 1`` for ``BTCV_ORGANS[i]``.
    """
    shape = ct_phantom_shape(size)
    rng = np.random.default_rng(seed)
    grids = _grid(shape)
    body, inner, spine = _body(grids, rng)
    image = np.full(shape, HU_AIR, dtype=np.float32)
    image[body] = HU_FAT
    image[inner] = HU_SOFT_TISSUE
    image[spine & inner] = HU_BONE
    label = np.zeros(shape, dtype=np.uint8)
    drop_gallbladder = rng.random() < missing_gallbladder_prob
    for organ, (centre, radii, hu) in _ABDOMEN.items():
        c = np.asarray(centre, dtype=np.float32) + rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
        r = _min_radii(np.asarray(radii) * rng.uniform(0.85, 1.15, size=3), shape)
        mean_hu = hu + rng.uniform(-10.0, 10.0)
        if organ == "gallbladder" and drop_gallbladder:
            continue
        mask = (_ellipsoid(grids, c, r) < 1.0) & inner & ~spine
        label[mask] = BTCV_ORGANS.index(organ) + 1
        image[mask] = mean_hu
    image += rng.normal(0.0, 10.0, size=shape).astype(np.float32) * body
    return image, label


def spleen_like(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An abdominal CT-like volume with one labelled spleen (MSD Task09 conventions).

    Same body, fat, spine and noise as :func:`btcv_like`; liver, kidneys and aorta are drawn but not
    labelled, so the spleen has look-alike neighbours.

    Returns:
        image: (X, Y, Z) float32 HU in RAS+ voxel order (shape from :func:`ct_phantom_shape`).
        label: (X, Y, Z) uint8, 0 background, 1 spleen.
    """
    shape = ct_phantom_shape(size)
    rng = np.random.default_rng(seed)
    grids = _grid(shape)
    body, inner, spine = _body(grids, rng)
    image = np.full(shape, HU_AIR, dtype=np.float32)
    image[body] = HU_FAT
    image[inner] = HU_SOFT_TISSUE
    image[spine & inner] = HU_BONE
    label = np.zeros(shape, dtype=np.uint8)
    for organ in ("liver", "right kidney", "left kidney", "aorta", "spleen"):  # spleen last: never hidden
        centre, radii, hu = _ABDOMEN[organ]
        c = np.asarray(centre, dtype=np.float32) + rng.uniform(-0.05, 0.05, size=3).astype(np.float32)
        r = _min_radii(np.asarray(radii) * rng.uniform(0.8, 1.2, size=3), shape)
        mask = (_ellipsoid(grids, c, r) < 1.0) & inner & ~spine
        image[mask] = hu + rng.uniform(-10.0, 10.0)
        if organ == "spleen":
            label[mask] = 1
    image += rng.normal(0.0, 10.0, size=shape).astype(np.float32) * body
    return image, label
