"""Acquisition shifts: a labelled test scan as another scanner or protocol would have recorded it.

A network that is only ever tested on scans like its training scans says nothing about the scans a
user will bring. Each shift here is applied once to a NIfTI test volume (image and label, nibabel
images in, nibabel images out) and mimics one real difference between acquisitions:

============== ======================================================================================
name           what differs, and where it happens in practice
============== ======================================================================================
resolution     voxel size and anisotropy: thick-slice clinical protocols (e.g. 1.2 x 1.2 x 3 mm
               instead of an isotropic research 1 or 2 mm); the through-plane slice profile blurs
               before sampling (partial-volume effect)
orientation    the voxel axis order and directions stored in the file (e.g. LSA from a sagittal
               acquisition instead of RAS); the same anatomy, another array layout
field_of_view  a larger field of view: more air around the head (a head-neck coil, a generous
               planning box); air is image 0 and background label, placed off-centre
bias_field     a smooth multiplicative intensity inhomogeneity from the receive coil's sensitivity
               profile (Sled et al., "A nonparametric method for automatic correction of intensity
               nonuniformity in MRI data", IEEE TMI 17:87-97, 1998)
gamma          a different tissue contrast (another TR/TE/TI, another vendor's reconstruction),
               modelled as a gamma change of the intensity curve
noise          thermal noise of a magnitude image: Rician (Gudbjartsson & Patz, "The Rician
               distribution of noisy MRI data", MRM 34:910-914, 1995); air becomes noise, not zero
all            every shift above, in acquisition order: field of view, resolution, orientation,
               bias field, gamma, noise
============== ======================================================================================

Geometry stays consistent: an image and its label always share one grid and affine, labels are
resampled by nearest neighbour, and a shifted label overlays the original label in world (scanner mm)
coordinates within a voxel. Every shift is deterministic for a given ``seed``. Resampling and
reorientation use nibabel (``nibabel.processing``, ``as_reoriented``); the intensity shifts use MONAI's
``RandBiasField``, ``AdjustContrast`` and ``RandRicianNoise`` with fixed seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from monai.transforms import AdjustContrast, RandBiasField, RandRicianNoise
from nibabel.orientations import aff2axcodes, axcodes2ornt, io_orientation, ornt_transform
from nibabel.processing import conform, smooth_image

__all__ = [
    "AcquisitionShift",
    "SHIFTS",
    "apply_shift",
    "bias_field",
    "change_voxel_size",
    "enlarge_field_of_view",
    "gamma_contrast",
    "list_shifts",
    "reorient",
    "rician_noise",
]

Pair = tuple[nib.Nifti1Image, nib.Nifti1Image]


def _check_pair(image: nib.Nifti1Image, label: nib.Nifti1Image) -> None:
    if image.ndim != 3 or label.ndim != 3:
        raise ValueError(f"acquisition shifts take 3D image and label volumes, got shapes {image.shape} and {label.shape}")
    if image.shape != label.shape:
        raise ValueError(f"image shape {image.shape} and label shape {label.shape} differ")
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        raise ValueError(f"image and label affines differ:\n{image.affine}\n{label.affine}")


def _image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)


def _label(data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.asarray(data).astype(like.get_data_dtype()), affine)


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def change_voxel_size(
    image: nib.Nifti1Image, label: nib.Nifti1Image, voxel_size: Sequence[float] = (1.2, 1.2, 3.0)
) -> Pair:
    """Resample to ``voxel_size`` mm (along the volume's own voxel axes, orientation kept), covering the
    same field of view.

    Where a voxel grows, the image is first smoothed along that axis by a Gaussian of FWHM
    ``sqrt(new**2 - old**2)`` mm, so that the coarse voxel averages over its extent like a thick slice
    (the slice profile) instead of point-sampling the fine one. The image is then interpolated linearly
    (no overshoot: air stays >= 0), the label by nearest neighbour, both onto the same grid centred on
    the original one (``nibabel.processing.conform``).
    """
    _check_pair(image, label)
    target = np.asarray(voxel_size, dtype=float)
    if target.shape != (3,) or (target <= 0).any():
        raise ValueError(f"voxel_size must be three positive numbers of mm, got {voxel_size}")
    old = _voxel_sizes(image.affine)
    fwhm = np.sqrt(np.clip(target**2 - old**2, 0.0, None))
    blurred = smooth_image(image, fwhm, mode="constant", cval=0.0) if (fwhm > 0).any() else image
    out_shape = tuple(int(np.ceil(n * o / t - 1e-6)) for n, o, t in zip(image.shape, old, target))
    axcodes = "".join(aff2axcodes(image.affine))
    grid = {"out_shape": out_shape, "voxel_size": tuple(target), "orientation": axcodes, "cval": 0.0}
    new_image = conform(blurred, order=1, **grid)
    new_label = conform(label, order=0, **grid)
    return _image(np.clip(new_image.get_fdata(), 0.0, None), new_image.affine), _label(
        np.rint(new_label.get_fdata()), new_label.affine, label
    )


def reorient(image: nib.Nifti1Image, label: nib.Nifti1Image, axcodes: str = "LSA") -> Pair:
    """Store the volume with voxel axes in another order and direction (``axcodes``, e.g. ``LSA``: the
    first axis runs to the left, the second up, the third forward). Exact: no resampling, the world
    position of every voxel is unchanged."""
    _check_pair(image, label)
    pairs = [{"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(code) for code in axcodes.upper()]
    if len(axcodes) != 3 or sorted(p for p in pairs if p is not None) != [0, 1, 2]:
        raise ValueError(f"axcodes {axcodes!r} is not an orientation: one of L/R, one of A/P and one of S/I, e.g. 'LSA'")
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(tuple(axcodes.upper())))
    return image.as_reoriented(transform), label.as_reoriented(transform)


def enlarge_field_of_view(
    image: nib.Nifti1Image, label: nib.Nifti1Image, growth: float = 0.4, seed: int = 0
) -> Pair:
    """Pad every axis with air (image 0, background label) so that it grows by ``growth`` of its length,
    split between the two ends at a seeded ratio in [0.25, 0.75] (the head sits off-centre); the affine
    moves the origin so that the original voxels keep their world positions."""
    _check_pair(image, label)
    if growth <= 0:
        raise ValueError(f"growth must be > 0 (a fraction of each axis's length), got {growth}")
    rng = np.random.default_rng(seed)
    total = np.maximum(1, np.rint(np.asarray(image.shape) * growth).astype(int))
    before = np.rint(total * rng.uniform(0.25, 0.75, size=3)).astype(int)
    pad = [(int(b), int(t - b)) for b, t in zip(before, total)]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ (-before) + image.affine[:3, 3]
    new_image = np.pad(np.asarray(image.dataobj, dtype=np.float32), pad, mode="constant", constant_values=0.0)
    new_label = np.pad(np.asarray(label.dataobj), pad, mode="constant", constant_values=0)
    return _image(new_image, affine), _label(new_label, affine, label)


def bias_field(
    image: nib.Nifti1Image, label: nib.Nifti1Image, coeff_range: tuple[float, float] = (-0.2, 0.2), seed: int = 0
) -> Pair:
    """Multiply the image by a smooth field ``exp(p(x, y, z))``, ``p`` a degree-3 Legendre polynomial over
    the volume whose coefficients are drawn, seeded, from ``coeff_range`` (MONAI ``RandBiasField``; the
    polynomial bias model of Van Leemput et al., "Automated model-based bias field correction of MR images
    of the brain", IEEE TMI 18:885-896, 1999). At the default range the field's largest to smallest value
    over the MNI152 head is 1.3 to 2.0 across seeds, its median 0.85 to 1.17 (a gain change as well). Air
    stays 0; the label is unchanged."""
    _check_pair(image, label)
    transform = RandBiasField(degree=3, coeff_range=coeff_range, prob=1.0)
    transform.set_random_state(seed=seed)
    data = np.asarray(image.dataobj, dtype=np.float32)[None]
    return _image(np.asarray(transform(data))[0], image.affine), label


def gamma_contrast(image: nib.Nifti1Image, label: nib.Nifti1Image, gamma: float = 1.6) -> Pair:
    """Map intensities through ``((x - min) / range) ** gamma * range + min`` (MONAI ``AdjustContrast``):
    the same range, another contrast between tissues (gamma > 1 darkens the mid-grey tissues). The label
    is unchanged."""
    _check_pair(image, label)
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    data = np.asarray(image.dataobj, dtype=np.float32)[None]
    return _image(np.asarray(AdjustContrast(gamma=gamma)(data))[0], image.affine), label


def rician_noise(
    image: nib.Nifti1Image, label: nib.Nifti1Image, relative_std: float = 0.04, seed: int = 0
) -> Pair:
    """Rician noise as in a magnitude MR image: ``sqrt((x + n1)**2 + n2**2)`` with ``n1, n2`` Gaussian
    of standard deviation ``relative_std`` times the image's 99th intensity percentile (MONAI
    ``RandRicianNoise``, seeded). Air turns into Rayleigh-distributed noise, as in real scans."""
    _check_pair(image, label)
    if relative_std <= 0:
        raise ValueError(f"relative_std must be > 0, got {relative_std}")
    data = np.asarray(image.dataobj, dtype=np.float32)
    std = relative_std * float(np.percentile(data, 99))
    transform = RandRicianNoise(prob=1.0, mean=0.0, std=std, sample_std=False)
    transform.set_random_state(seed=seed)
    return _image(np.asarray(transform(data[None]))[0], image.affine), label


def _all_shifts(image: nib.Nifti1Image, label: nib.Nifti1Image, seed: int) -> Pair:
    seeds = np.random.SeedSequence(seed).generate_state(3)
    image, label = enlarge_field_of_view(image, label, seed=int(seeds[0]))
    image, label = change_voxel_size(image, label)
    image, label = reorient(image, label)
    image, label = bias_field(image, label, seed=int(seeds[1]))
    image, label = gamma_contrast(image, label)
    return rician_noise(image, label, seed=int(seeds[2]))


@dataclass(frozen=True)
class AcquisitionShift:
    """One named shift with its default settings: ``apply(image, label, seed)`` -> (image, label)."""

    name: str
    mimics: str
    apply: Callable[[nib.Nifti1Image, nib.Nifti1Image, int], Pair]


SHIFTS: dict[str, AcquisitionShift] = {
    s.name: s
    for s in (
        AcquisitionShift("resolution", "thick-slice anisotropic protocol, 1.2 x 1.2 x 3 mm voxels",
                         lambda im, lb, seed: change_voxel_size(im, lb)),
        AcquisitionShift("orientation", "another stored axis order, LSA",
                         lambda im, lb, seed: reorient(im, lb)),
        AcquisitionShift("field_of_view", "40 % larger field of view per axis, padded with air, off-centre",
                         lambda im, lb, seed: enlarge_field_of_view(im, lb, seed=seed)),
        AcquisitionShift("bias_field", "receive-coil intensity inhomogeneity (smooth multiplicative field)",
                         lambda im, lb, seed: bias_field(im, lb, seed=seed)),
        AcquisitionShift("gamma", "another tissue contrast (gamma 1.6)",
                         lambda im, lb, seed: gamma_contrast(im, lb)),
        AcquisitionShift("noise", "Rician magnitude noise, std 4 % of the 99th percentile",
                         lambda im, lb, seed: rician_noise(im, lb, seed=seed)),
        AcquisitionShift("all", "all of the above, in acquisition order", _all_shifts),
    )
}


def list_shifts() -> list[str]:
    """Names of the defined shifts, in table order."""
    return list(SHIFTS)


def apply_shift(name: str, image: nib.Nifti1Image, label: nib.Nifti1Image, seed: int = 0) -> Pair:
    """Apply the shift called ``name`` with its default settings (see the module table)."""
    if name not in SHIFTS:
        raise ValueError(f"unknown acquisition shift {name!r}; known shifts: {', '.join(SHIFTS)}")
    _check_pair(image, label)
    return SHIFTS[name].apply(image, label, seed)
