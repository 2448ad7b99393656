"""Labelled external test scans from disk: score a trained checkpoint on scans it has never seen.

A data module given ``test_dir`` replaces its test split with the cases found there, laid out as
nnU-Net's raw test folders (Isensee et al., Nature Methods 2021; the nnU-Net v2 dataset format)::

    <test_dir>/imagesTs/<case>_0000.nii.gz   [<case>_0001.nii.gz ...]   (one file per channel)
    <test_dir>/labelsTs/<case>.nii.gz

A single-channel image may also drop the channel suffix (``imagesTs/<case>.nii.gz``). Every image needs
its label and every label its image; the channel files of a case are numbered ``0000`` upwards without
gaps. Pairing is checked from file names when the data module is built, headers and label values when
the test split is first read (:mod:`segresmamba.data.validation`), so a bad layout stops a run before
any scoring, with a ValueError naming the file.

The scans are read through :func:`external_eval_transforms`: load, channel first, RAS, resampling to the
training grid's voxel spacing (image linear, label nearest), then the data module's own intensity
normalisation (the one its training used), so an external scan reaches the network as a training scan
did.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import torch
from monai.transforms import Compose

from segresmamba.data.transforms import load_channel_first, to_ras, whole_volume_eval_transforms
from segresmamba.data.validation import CaseFiles, is_hidden, require_directory, validate_cases

__all__ = ["external_eval_transforms", "pair_test_dir", "read_test_dir", "write_test_case"]

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _nifti_files(folder: Path) -> dict[str, Path]:
    """``{name without .nii/.nii.gz: path}`` of the NIfTI files in ``folder``; ValueError on anything else."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_hidden(path) or path.is_dir():
            continue
        match = _NIFTI.match(path.name)
        if match is None:
            raise ValueError(f"test_dir: {path} is not a NIfTI file (.nii or .nii.gz); only NIfTI files belong in {folder}")
        stem = match["stem"]
        if stem in found:
            raise ValueError(f"test_dir: {path} and {found[stem]} are the same case in two formats; keep one")
        found[stem] = path
    return found


def pair_test_dir(test_dir: str | Path) -> dict[str, tuple[tuple[Path, ...], Path]]:
    """``{case id: (image files in channel order, label file)}`` from ``imagesTs/`` and ``labelsTs/``.

    Raises:
        ValueError: a missing folder, an image without a label or a label without an image (naming the
            file), a gap in a case's channel numbers, cases with different channel counts, no cases.
    """
    root = require_directory(test_dir, "test_dir", "a folder holding imagesTs/ and labelsTs/ (nnU-Net layout)")
    folders = {name: root / name for name in ("imagesTs", "labelsTs")}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise ValueError(f"test_dir: {root} has no {name}/ folder (expected imagesTs/<case>_0000.nii.gz and labelsTs/<case>.nii.gz)")
    images, labels = _nifti_files(folders["imagesTs"]), _nifti_files(folders["labelsTs"])
    cases: dict[str, tuple[tuple[Path, ...], Path]] = {}
    used: set[str] = set()
    for case_id, label in labels.items():
        if case_id in images:  # a single-channel image without the channel suffix
            cases[case_id] = ((images[case_id],), label)
            used.add(case_id)
            continue
        channels = sorted((int(m["channel"]), stem) for stem in images if (m := _CHANNEL.match(stem)) and m["case"] == case_id)
        if not channels:
            raise ValueError(f"test_dir: label {label} has no image (expected {folders['imagesTs'] / (case_id + '_0000.nii.gz')})")
        numbers = [n for n, _ in channels]
        if numbers != list(range(len(numbers))):
            raise ValueError(f"test_dir: case {case_id!r} has channel files {numbers} in {folders['imagesTs']}; they must be numbered 0000, 0001, ... without gaps")
        cases[case_id] = (tuple(images[stem] for _, stem in channels), label)
        used.update(stem for _, stem in channels)
    for stem in sorted(set(images) - used):
        case_id = m["case"] if (m := _CHANNEL.match(stem)) else stem
        raise ValueError(f"test_dir: image {images[stem]} has no label (expected {folders['labelsTs'] / (case_id + '.nii.gz')})")
    if not cases:
        raise ValueError(f"test_dir: no labelled cases in {root} (imagesTs/ and labelsTs/ are empty)")
    counts = {len(files) for files, _ in cases.values()}
    if len(counts) > 1:
        raise ValueError(f"test_dir: cases in {root} have different numbers of channel files: {sorted(counts)}")
    return cases


def write_test_case(test_dir: str | Path, case_id: str, image: nib.Nifti1Image, label: nib.Nifti1Image) -> tuple[Path, Path]:
    """Write one single-channel labelled case where :func:`pair_test_dir` finds it:
    ``imagesTs/<case_id>_0000.nii.gz`` and ``labelsTs/<case_id>.nii.gz``; returns the two paths."""
    paths = (Path(test_dir) / "imagesTs" / f"{case_id}_0000.nii.gz", Path(test_dir) / "labelsTs" / f"{case_id}.nii.gz")
    for path, img in zip(paths, (image, label)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
    return paths


def read_test_dir(
    test_dir: str | Path, *, dataset: str, channels: int, label_values: Sequence[int] | None
) -> list[dict]:
    """Pair, validate and list the cases of ``test_dir`` as MONAI items
    ``{"image": path or [paths], "label": path, "case_id": str}``.

    A case is one 3D file per channel, or one 4D file holding all ``channels``. ``label_values`` are the
    allowed label values (``None``: not checked). Raises ValueError naming every bad file.
    """
    pairs = pair_test_dir(test_dir)
    allowed = None if label_values is None else frozenset(int(v) for v in label_values)
    cases = [
        CaseFiles(case_id=case_id, images=files, label=label, channels=channels, label_values=allowed)
        for case_id, (files, label) in pairs.items()
    ]
    good = validate_cases(cases, dataset=f"{dataset} test_dir", root=test_dir, check_labels=allowed is not None)
    return [
        {"image": [str(p) for p in c.images] if len(c.images) > 1 else str(c.images[0]), "label": str(c.label), "case_id": c.case_id}
        for c in good
    ]


def external_eval_transforms(
    spacing: Sequence[float] | None, normalisation: Sequence, label_dtype: torch.dtype = torch.int64
) -> Compose:
    """Load, channel first (a list of channel files is stacked), RAS, resample to ``spacing`` mm (image
    bilinear, label nearest; ``None`` keeps each scan's grid), then ``normalisation`` (the data module's
    intensity transforms on ``image``). Like every on-disk evaluation chain it is invertible and keeps the
    label as stored (:data:`~segresmamba.data.transforms.ORIGINAL_LABEL`) for scoring in the scan's own
    space."""
    return whole_volume_eval_transforms(load_channel_first() + to_ras(spacing) + list(normalisation), label_dtype)
