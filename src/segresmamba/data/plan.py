"""Dataset fingerprint and preprocessing plan, as nnU-Net plans them (Isensee et al., "nnU-Net: a
self-configuring method for deep learning-based biomedical image segmentation", Nature Methods 18:203-211,
2021; nnU-Net v2's ``DatasetFingerprintExtractor`` and ``ExperimentPlanner``).

Fingerprint, from the training cases only (in RAS voxel order, the order the pipeline reorients to):
per case the voxel spacing, the shape, the shape of the bounding box of the nonzero region and its
relative size, and per channel the foreground (label > 0) intensity percentiles; over all cases, per
channel, the statistics of foreground intensities sampled from every case (``10^7 / cases`` voxels each,
with replacement, seeded).

Plan, from the fingerprint:

- target spacing: the median spacing per axis. Anisotropic datasets (nnU-Net's rule, threshold 3: the
  coarsest median axis is more than 3 times the finest other axis *and* has fewer than a third of the
  median voxels of the others) take the 10th percentile of that axis's spacings instead, but never finer
  than the other axes.
- normalisation per channel: CT (modality "CT") is clipped to the foreground 0.5/99.5 percentiles and
  z-scored with the foreground mean and standard deviation; every other modality is z-scored per image,
  over the nonzero voxels only when cropping to the nonzero region shrinks the median case to less than
  three quarters of its size (nnU-Net's ``use_mask_for_norm`` rule), else over the whole image.

Plans are cached as JSON (``segresmamba-plan-v1``) beside the split file, keyed by a hash of the training
cases (ids, file names and sizes) and modalities: a changed dataset gets a new plan. Explicit
``spacing`` / ``intensity_window`` settings override the plan (:func:`plan_with_overrides`); the record
says which.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from segresmamba.data.splits import read_json_object, write_json_or_warn
from segresmamba.data.validation import CaseFiles

__all__ = [
    "PLAN_FORMAT",
    "ANISOTROPY_THRESHOLD",
    "case_fingerprint",
    "read_case_ras",
    "fingerprint_cases",
    "make_plan",
    "cases_key",
    "load_or_create_plan",
    "plan_with_overrides",
]

PLAN_FORMAT = "segresmamba-plan-v1"
ANISOTROPY_THRESHOLD = 3.0
"""nnU-Net's ``anisotropy_threshold``: a spacing ratio above it makes a dataset anisotropic."""
FOREGROUND_VOXELS_FOR_STATS = 10_000_000
"""Foreground voxels sampled for the intensity statistics, over all training cases together (nnU-Net)."""
NONZERO_CROP_SIZE_FOR_MASK = 0.75
"""Median relative size after cropping to the nonzero region below which z-scoring uses the nonzero mask."""
SAMPLING_SEED = 1234
PERCENTILES = (0.5, 50.0, 99.5)


def _round(values: Iterable[float], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def case_fingerprint(
    image: np.ndarray, label: np.ndarray, spacing: Sequence[float], num_samples: int, rng: np.random.Generator
) -> tuple[dict, list[np.ndarray]]:
    """One case's fingerprint and its sampled foreground intensities per channel.

    Args:
        image: (C, X, Y, Z) intensities.
        label: (X, Y, Z) or (L, X, Y, Z) labels; foreground = nonzero in any label channel.
        spacing: voxel size (mm) per spatial axis.
        num_samples: foreground voxels sampled per channel (with replacement).
    """
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"fingerprint: expected a (C, X, Y, Z) image, got shape {image.shape}")
    shape = image.shape[1:]
    label = np.asarray(label)
    foreground = (label != 0).reshape((-1, *shape)).any(0) if label.ndim == 4 else label != 0
    if foreground.shape != shape:
        raise ValueError(f"fingerprint: label shape {label.shape} does not match image shape {image.shape}")
    nonzero = (image != 0).any(0)
    if nonzero.any():
        where = np.nonzero(nonzero)
        cropped = [int(w.max() - w.min() + 1) for w in where]
    else:
        cropped = list(shape)
    percentiles, samples = [], []
    for channel in image:
        values = channel[foreground]
        if values.size:
            percentiles.append(_round(np.percentile(values, PERCENTILES)))
            samples.append(rng.choice(values, num_samples, replace=True).astype(np.float64))
        else:
            percentiles.append(None)
            samples.append(np.empty(0))
    record = {
        "spacing": _round(spacing),
        "shape": [int(s) for s in shape],
        "shape_after_crop": cropped,
        "relative_size_after_crop": round(float(np.prod(cropped) / np.prod(shape)), 6),
        "foreground_voxels": int(foreground.sum()),
        "foreground_percentiles": percentiles,
    }
    return record, samples


def read_case_ras(case: CaseFiles) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A case from disk, in the closest RAS voxel order (as MONAI ``Orientationd("RAS")`` gives it):
    image (C, X, Y, Z) float32, label (X, Y, Z), spacing per RAS axis."""
    channels, spacing = [], None
    for path in case.images:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        channels.extend([data] if data.ndim == 3 else list(np.moveaxis(data.reshape(*data.shape[:3], -1), -1, 0)))
        spacing = [float(z) for z in img.header.get_zooms()[:3]]
    seg = nib.as_closest_canonical(nib.load(str(case.label)))
    label = np.asarray(seg.dataobj).reshape(seg.shape[:3])
    return np.stack(channels), label, spacing  # type: ignore[return-value]


def fingerprint_cases(cases: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]] | Callable, num_cases: int) -> dict:
    """The dataset fingerprint of ``num_cases`` training cases, each ``(image, label, spacing)`` as in
    :func:`case_fingerprint`; ``cases`` may be a sequence or a callable ``i -> case`` (read one at a time)."""
    if num_cases < 1:
        raise ValueError("fingerprint: no training cases")
    get = cases if callable(cases) else cases.__getitem__
    rng = np.random.default_rng(SAMPLING_SEED)
    per_case = max(1, FOREGROUND_VOXELS_FOR_STATS // num_cases)
    records, pooled = [], None
    for i in range(num_cases):
        image, label, spacing = get(i)
        record, samples = case_fingerprint(image, label, spacing, per_case, rng)
        records.append(record)
        pooled = [[s] for s in samples] if pooled is None else [p + [s] for p, s in zip(pooled, samples)]
    assert pooled is not None
    stats = []
    for channel in pooled:
        values = np.concatenate(channel)
        if not values.size:
            stats.append(None)
            continue
        p005, median, p995 = np.percentile(values, PERCENTILES)
        stats.append(
            {
                "mean": float(values.mean()), "std": float(values.std()), "median": float(median),
                "min": float(values.min()), "max": float(values.max()),
                "percentile_00_5": float(p005), "percentile_99_5": float(p995),
            }
        )
    return {"cases": records, "foreground_intensity": stats}


def _target_spacing(fingerprint: dict) -> tuple[list[float], int | None]:
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]], dtype=np.float64)
    sizes = np.array([c["shape_after_crop"] for c in fingerprint["cases"]], dtype=np.float64)
    target = np.percentile(spacings, 50, axis=0)
    median_size = np.percentile(sizes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[i] for i in others)
    if not (aniso_spacing and aniso_voxels):
        return _round(target), None
    coarse = float(np.percentile(spacings[:, worst], 10))
    finest_other = max(target[i] for i in others)
    target[worst] = coarse if coarse >= finest_other else finest_other + 1e-5  # never finer than the others
    return _round(target), worst


def make_plan(fingerprint: dict, modalities: Sequence[str]) -> dict:
    """The preprocessing plan of a fingerprint (see the module docstring): ``target_spacing``,
    ``anisotropic_axis`` (or None), ``normalization`` (one entry per channel, as
    :func:`segresmamba.data.transforms.plan_normalization` reads it) and the facts behind them."""
    stats = fingerprint["foreground_intensity"]
    if len(modalities) != len(stats):
        raise ValueError(f"plan: {len(modalities)} modalities given for a fingerprint of {len(stats)} channels")
    relative = float(np.median([c["relative_size_after_crop"] for c in fingerprint["cases"]]))
    use_mask = relative < NONZERO_CROP_SIZE_FOR_MASK
    normalization = []
    for modality, channel in zip(modalities, stats):
        if str(modality).strip().casefold() == "ct":
            if channel is None:
                raise ValueError("plan: a CT channel has no foreground voxels in any training case (no labels?)")
            normalization.append(
                {
                    "scheme": "ct", "clip": _round([channel["percentile_00_5"], channel["percentile_99_5"]], 4),
                    "mean": round(channel["mean"], 6), "std": round(max(channel["std"], 1e-8), 6),
                }
            )
        else:
            normalization.append({"scheme": "zscore", "use_nonzero_mask": use_mask})
    spacing, aniso_axis = _target_spacing(fingerprint)
    return {
        "target_spacing": spacing,
        "anisotropic_axis": aniso_axis,
        "normalization": normalization,
        "modalities": [str(m) for m in modalities],
        "median_relative_size_after_crop": round(relative, 6),
        "median_shape": _round(np.median([c["shape"] for c in fingerprint["cases"]], axis=0), 2),
        "num_training_cases": len(fingerprint["cases"]),
    }


def cases_key(cases: Sequence[CaseFiles], modalities: Sequence[str]) -> str:
    """Hash of what a plan depends on: the training cases' ids, file names and sizes, and the modalities."""
    entries = []
    for case in sorted(cases, key=lambda c: c.case_id):
        files = [*case.images, case.label]
        entries.append([case.case_id, [[Path(f).name, Path(f).stat().st_size] for f in files]])
    payload = json.dumps({"format": PLAN_FORMAT, "modalities": [str(m) for m in modalities], "cases": entries})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_create_plan(
    path: Path | None, key: str, fingerprint: Callable[[], dict], modalities: Sequence[str]
) -> dict:
    """The record ``{"format", "key", "path", "fingerprint", "plan"}`` cached at ``path`` when its key
    matches, else a new one from ``fingerprint()`` written there (an unwritable place only warns; a file
    with another key is replaced: the dataset changed)."""
    if path is not None and path.is_file():
        data = read_json_object(path, "plan file")
        if data.get("format") == PLAN_FORMAT and data.get("key") == key and isinstance(data.get("plan"), dict):
            return {**data, "path": str(path)}
    record = {"format": PLAN_FORMAT, "key": key, "fingerprint": fingerprint()}
    record["plan"] = make_plan(record["fingerprint"], modalities)
    if path is not None:
        write_json_or_warn(path, record, "plan")
    return {**record, "path": str(path) if path is not None else None}


def plan_with_overrides(
    plan: dict, spacing: Sequence[float] | None = None, intensity_window: Sequence[float] | None = None
) -> dict:
    """``plan`` with explicit settings in force: ``spacing`` replaces the target spacing, and
    ``intensity_window`` replaces every channel's normalisation by the window mapped to [0, 1];
    ``overridden`` lists what the settings replaced."""
    out = dict(plan)
    overridden = []
    if spacing is not None:
        out["target_spacing"] = _round(spacing)
        overridden.append("target_spacing")
    if intensity_window is not None:
        out["normalization"] = [{"scheme": "window", "window": _round(intensity_window)} for _ in plan["normalization"]]
        overridden.append("normalization")
    out["overridden"] = overridden
    return out
