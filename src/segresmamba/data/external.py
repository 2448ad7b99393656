"""External scans from disk: score a trained checkpoint on labelled scans it has never seen
(``test_dir``), or predict masks for unlabelled ones (``predict_dir``).

A data module given ``test_dir`` replaces its test split with the cases found there, laid out as
nnU-Net's raw test folders (Isensee et al., Nature Methods 2021; the nnU-Net v2 dataset format)::

    <test_dir>/imagesTs/<case>_0000.nii.gz   [<case>_0001.nii.gz ...]   (one file per channel)
    <test_dir>/labelsTs/<case>.nii.gz

A case may also be one file without the channel suffix (``imagesTs/<case>.nii.gz``: 3D, or 4D holding
every channel, as the Decathlon stores multi-modal images). Every image needs its label and every label
its image; the channel files of a case are numbered ``0000`` upwards without gaps. Pairing is checked
from file names when the data module is built, headers, voxels and label values when the test split is
first read (:mod:`segresmamba.data.validation`), so bad input stops a run before any scoring, with an
:class:`~segresmamba.errors.InputError` naming the file. An empty label only warns here (a scored scan
may lack a class); the data module's ``empty_labels`` setting decides otherwise.

A data module given ``predict_dir`` predicts the images of that folder instead of its test split: the
same image naming (e.g. the ``imagesTs/`` of a Decathlon task, or any folder of NIfTI files), no labels,
checked like training images (headers, channel count, finite voxels).

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
from segresmamba.data.validation import CaseFiles, EmptyLabels, is_hidden, require_directory, validate_cases
from segresmamba.errors import InputError

__all__ = [
    "external_eval_transforms",
    "image_cases",
    "pair_test_dir",
    "predict_dir_cases",
    "read_predict_dir",
    "read_test_dir",
    "write_test_case",
]

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _nifti_files(folder: Path, setting: str) -> dict[str, Path]:
    """``{name without .nii/.nii.gz: path}`` of the NIfTI files in ``folder``; InputError on anything else."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_hidden(path) or path.is_dir():
            continue
        match = _NIFTI.match(path.name)
        if match is None:
            raise InputError(f"{setting}: {path} is not a NIfTI file (.nii or .nii.gz); only NIfTI files belong in {folder}")
        stem = match["stem"]
        if stem in found:
            raise InputError(f"{setting}: {path} and {found[stem]} are the same case in two formats; keep one")
        found[stem] = path
    return found


def image_cases(folder: Path, setting: str) -> dict[str, tuple[Path, ...]]:
    """``{case id: image files in channel order}`` of the NIfTI images in ``folder``.

    Files named ``<case>_0000``, ``<case>_0001``, ... are the channels of ``<case>`` (nnU-Net's naming;
    numbered from 0000 without gaps); any other file is a case of its own, named by the file (3D, or 4D
    with every channel). A ``_NNNN`` name without a ``_0000`` beside it is a case of its own too.
    """
    files = _nifti_files(folder, setting)
    numbered: dict[str, dict[int, Path]] = {}
    for stem, path in files.items():
        if match := _CHANNEL.match(stem):
            numbered.setdefault(match["case"], {})[int(match["channel"])] = path
    cases: dict[str, tuple[Path, ...]] = {}
    grouped: set[Path] = set()
    for case_id, channels in numbered.items():
        if 0 not in channels:
            continue
        numbers = sorted(channels)
        if numbers != list(range(len(numbers))):
            raise InputError(f"{setting}: case {case_id!r} has channel files {numbers} in {folder}; they must be numbered 0000, 0001, ... without gaps")
        if case_id in files:
            raise InputError(f"{setting}: {files[case_id]} and {channels[0]} are both case {case_id!r}; keep one")
        cases[case_id] = tuple(channels[n] for n in numbers)
        grouped.update(channels.values())
    cases.update((stem, (path,)) for stem, path in files.items() if path not in grouped)
    return dict(sorted(cases.items()))


def pair_test_dir(test_dir: str | Path) -> dict[str, tuple[tuple[Path, ...], Path]]:
    """``{case id: (image files in channel order, label file)}`` from ``imagesTs/`` and ``labelsTs/``.

    Raises:
        InputError: a missing folder, an image without a label or a label without an image (naming the
            file), a gap in a case's channel numbers, cases with different channel counts, no cases.
    """
    root = require_directory(test_dir, "test_dir", "a folder holding imagesTs/ and labelsTs/ (nnU-Net layout)")
    folders = {name: root / name for name in ("imagesTs", "labelsTs")}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise InputError(f"test_dir: {root} has no {name}/ folder (expected imagesTs/<case>_0000.nii.gz and labelsTs/<case>.nii.gz)")
    images, labels = image_cases(folders["imagesTs"], "test_dir"), _nifti_files(folders["labelsTs"], "test_dir")
    for case_id, label in labels.items():
        if case_id not in images:
            raise InputError(f"test_dir: label {label} has no image (expected {folders['imagesTs'] / (case_id + '_0000.nii.gz')})")
    for case_id, files in images.items():
        if case_id not in labels:
            raise InputError(f"test_dir: image {files[0]} has no label (expected {folders['labelsTs'] / (case_id + '.nii.gz')})")
    if not images:
        raise InputError(f"test_dir: no labelled cases in {root} (imagesTs/ and labelsTs/ are empty)")
    counts = {len(files) for files in images.values()}
    if len(counts) > 1:
        raise InputError(f"test_dir: cases in {root} have different numbers of channel files: {sorted(counts)}")
    return {case_id: (files, labels[case_id]) for case_id, files in images.items()}


def predict_dir_cases(predict_dir: str | Path) -> dict[str, tuple[Path, ...]]:
    """``{case id: image files in channel order}`` of a folder of unlabelled images (:func:`image_cases`):
    checked from file names only. InputError on a missing folder, a file that is not NIfTI, no images."""
    root = require_directory(predict_dir, "predict_dir", "a folder of NIfTI images to predict, e.g. the imagesTs/ of a Decathlon task")
    cases = image_cases(root, "predict_dir")
    if not cases:
        raise InputError(f"predict_dir: no NIfTI images (.nii or .nii.gz) in {root}")
    return cases


def write_test_case(test_dir: str | Path, case_id: str, image: nib.Nifti1Image, label: nib.Nifti1Image) -> tuple[Path, Path]:
    """Write one single-channel labelled case where :func:`pair_test_dir` finds it:
    ``imagesTs/<case_id>_0000.nii.gz`` and ``labelsTs/<case_id>.nii.gz``; returns the two paths."""
    paths = (Path(test_dir) / "imagesTs" / f"{case_id}_0000.nii.gz", Path(test_dir) / "labelsTs" / f"{case_id}.nii.gz")
    for path, img in zip(paths, (image, label)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
    return paths


def _item(case: CaseFiles) -> dict:
    image: str | list[str] = [str(p) for p in case.images] if len(case.images) > 1 else str(case.images[0])
    return {"image": image, "case_id": case.case_id, **({"label": str(case.label)} if case.label is not None else {})}


def read_test_dir(
    test_dir: str | Path,
    *,
    dataset: str,
    channels: int,
    label_values: Sequence[int] | None,
    empty_labels: EmptyLabels = "warn",
    cache_file: str | Path | None = None,
) -> list[dict]:
    """Pair, validate and list the cases of ``test_dir`` as MONAI items
    ``{"image": path or [paths], "label": path, "case_id": str}``.

    A case is one 3D file per channel, or one 4D file holding all ``channels``. ``label_values`` are the
    allowed label values (``None``: any whole number); an empty label only warns by default (a scored scan
    may truly lack a class). Every voxel is read (:mod:`segresmamba.data.validation`; remembered in
    ``cache_file``). Raises InputError naming every bad file.
    """
    pairs = pair_test_dir(test_dir)
    allowed = None if label_values is None else frozenset(int(v) for v in label_values)
    cases = [
        CaseFiles(case_id=case_id, images=files, label=label, channels=channels, label_values=allowed, empty_label=empty_labels)
        for case_id, (files, label) in pairs.items()
    ]
    good, _ = validate_cases(cases, dataset=f"{dataset} test_dir", root=test_dir, cache_file=cache_file)
    return [_item(c) for c in good]


def read_predict_dir(predict_dir: str | Path, *, dataset: str, channels: int, cache_file: str | Path | None = None) -> list[dict]:
    """Validate and list the images of ``predict_dir`` (:func:`predict_dir_cases`) as MONAI items
    ``{"image": path or [paths], "case_id": str}``: headers, channel count and every voxel (finite), as
    for training data. Raises InputError naming every bad file."""
    cases = [
        CaseFiles(case_id=case_id, images=files, label=None, channels=channels)
        for case_id, files in predict_dir_cases(predict_dir).items()
    ]
    good, _ = validate_cases(cases, dataset=f"{dataset} predict_dir", root=predict_dir, cache_file=cache_file)
    return [_item(c) for c in good]


def external_eval_transforms(
    spacing: Sequence[float] | None, normalisation: Sequence, label_dtype: torch.dtype = torch.int64
) -> Compose:
    """Load, channel first (a list of channel files is stacked), RAS, resample to ``spacing`` mm (image
    bilinear, label nearest; ``None`` keeps each scan's grid), then ``normalisation`` (the data module's
    intensity transforms on ``image``). Like every on-disk evaluation chain it is invertible and keeps the
    label as stored (:data:`~segresmamba.data.transforms.ORIGINAL_LABEL`) for scoring in the scan's own
    space."""
    return whole_volume_eval_transforms(load_channel_first() + to_ras(spacing) + list(normalisation), label_dtype)
