"""nnU-Net v2 itself as an external baseline: run as nnU-Net, scored by this suite.

The field's benchmark rule (Isensee et al., "nnU-Net Revisited: A Call for Rigorous Validation in 3D
Medical Image Segmentation", MICCAI 2024) is to compare against nnU-Net run as nnU-Net. The model
``nnunet`` of this suite is a DynUNet with nnU-Net's default plan trained by our pipeline; ``nnunetv2``
is the real thing (Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical
image segmentation", Nature Methods 18:203-211, 2021): its own fingerprint, plan, preprocessing,
augmentation, training and sliding-window inference, through its Python API. Only the data and the
scoring are ours:

1. :func:`export_raw_dataset` writes the nnU-Net raw dataset of one fold from the data module's own cases
   (``imagesTr/<case>_0000.nii.gz``.., ``labelsTr/<case>.nii.gz``, ``dataset.json``) and our split as
   ``splits_final.json`` (every fold when the split file holds folds, else the one fold), plus the test
   cases (``imagesTs/``). Files on disk are linked, not copied; a 4D multi-channel image is cut into one
   file per channel; in-memory datasets are written as NIfTI with their affines.
2. :func:`run_nnunetv2` plans (``ExperimentPlanner`` or another planner by name), preprocesses and trains
   ``3d_fullres`` (trainer class by name; ``epochs`` and ``iterations_per_epoch`` set the trainer's own
   attributes before it initialises, so no trainer subclass is needed, and the checkpoint keeps the
   class name nnU-Net finds again at prediction), predicts the test cases with ``nnUNetPredictor`` (masks on
   each scan's own grid) and scores them against the labels as stored with :mod:`segresmamba.metrics`
   (Dice and HD95 per case and class, the original space).
3. It writes the record a sweep run writes (``metrics.json``: ``model``/``recipe`` ``nnunetv2``, ``test/dice_*``,
   ``test/hd95_*``, ``test_cases.csv``, wall time, peak GPU memory, energy through
   :class:`segresmamba.callbacks.EnergyTracker`, provenance, and nnU-Net's plan: patch, spacing,
   normalisation, network stages).

Labels: multiclass datasets are trained as they are stored. BraTS (labels 0/1/2/4) is trained region-based,
as nnU-Net trains BraTS (Isensee et al., "nnU-Net for Brain Tumor Segmentation", BrainLes 2020): the
training labels are written with enhancing tumour as 3 (nnU-Net needs consecutive label values, as its own
BraTS conversion does), and ``dataset.json`` declares the regions whole tumour {1, 2, 3}, tumour core
{1, 3} and enhancing tumour {3} with ``regions_class_order`` [2, 1, 3]; nnU-Net's masks are read back as
TC, WT, ET and scored against the labels as stored, like every other model. Other multilabel tasks
(overlapping regions that no label map holds) are refused.

Every nnU-Net folder (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``) lives under the run's
folder; nnU-Net's environment variables are set in the run's own process (:func:`main`) before nnunetv2 is
imported. A run restarts cleanly: its nnU-Net folders are wiped before it starts.

    python -m segresmamba.bench.nnunetv2 <run folder>/nnunetv2_run.json     (what a sweep runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nibabel as nib
import numpy as np
import torch

from segresmamba.callbacks import EnergyTracker, cases_file, write_case_rows
from segresmamba.metrics import case_rows, dice_per_class, hd95_per_class, label_to_onehot, summarise

__all__ = [
    "EXTERNAL_MODELS",
    "INSTALL_HINT",
    "NNUNET_FOLDERS",
    "NNUNetSettings",
    "RawDataset",
    "cases_in_test_dir",
    "check_dataset",
    "export_raw_dataset",
    "nnunet_provenance",
    "predict_cases",
    "preflight",
    "plan_summary",
    "require_nnunetv2",
    "run_nnunetv2",
    "score_predictions",
]

MODEL = "nnunetv2"
RECIPE = "nnunetv2"
EXTERNAL_MODELS = (MODEL,)
"""Models a sweep runs through their own runner rather than ``segresmamba fit``."""
INSTALL_HINT = 'nnunetv2 is not installed: pip install -e ".[nnunet]"'
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CONFIGURATION = "3d_fullres"
BRATS_DATA_NAMES = ("brats2021", "brats_synthetic")
# BraTS regions in the suite's output order [TC, WT, ET], in the labels as stored (enhancing tumour 4) and
# as nnU-Net trains and predicts them (enhancing tumour 3); nnU-Net paints WT as 2, then TC as 1, then ET as 3
BRATS_STORED_REGIONS = ((1, 4), (1, 2, 4), (4,))
BRATS_NNUNET_REGIONS = ((1, 3), (1, 2, 3), (3,))
BRATS_DATASET_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": [3]}
BRATS_REGIONS_CLASS_ORDER = [2, 1, 3]
BRATS_ENHANCING_STORED, BRATS_ENHANCING_NNUNET = 4, 3


def require_nnunetv2() -> str:
    """The installed nnunetv2 version; ValueError with the one line that installs it when it is missing."""
    try:
        import nnunetv2  # noqa: F401  (the bare package: nnU-Net reads its path variables later, when used)
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class NNUNetSettings:
    """How nnU-Net runs (the ``nnunetv2:`` block of a sweep file).

    Attributes:
        trainer: nnU-Net trainer class by name (``nnUNetTrainer``, or a variant shipped with nnU-Net, e.g.
            ``nnUNetTrainer_250epochs``, ``nnUNetTrainerNoMirroring``).
        planner: nnU-Net experiment planner by name (``ExperimentPlanner``; the residual-encoder presets
            ``nnUNetPlannerResEncM``/``L``/``XL``).
        epochs: training epochs; ``None`` keeps the trainer's own (1000 for ``nnUNetTrainer``).
        iterations_per_epoch: training iterations per epoch; ``None`` keeps the trainer's (250).
        val_iterations_per_epoch: nnU-Net's pseudo-Dice iterations per epoch; ``None`` keeps the trainer's (50).
        dataset_id: the nnU-Net dataset number (``Dataset<id>_<name>``), 1..999.
        device: ``cuda``, ``cpu`` or ``auto`` (a GPU when one is visible).
        preprocessing_processes: worker processes of fingerprinting, preprocessing and prediction.
        augmentation_processes: nnU-Net's data augmentation workers (``nnUNet_n_proc_DA``); ``None``
            leaves nnU-Net's choice, 0 augments in the training process.
        compile: let nnU-Net ``torch.compile`` the network (``nnUNet_compile``; nnU-Net never compiles on a CPU).
        run_validation: also run nnU-Net's own validation of the fold after training (its
            ``validation/summary.json``; not the reported score, which is ours on the test cases).
        tile_step_size, use_mirroring: ``nnUNetPredictor`` sliding-window overlap and test-time mirroring.
    """

    trainer: str = "nnUNetTrainer"
    planner: str = "ExperimentPlanner"
    epochs: int | None = None
    iterations_per_epoch: int | None = None
    val_iterations_per_epoch: int | None = None
    dataset_id: int = 500
    device: str = "auto"
    preprocessing_processes: int = 2
    augmentation_processes: int | None = None
    compile: bool = False
    run_validation: bool = False
    tile_step_size: float = 0.5
    use_mirroring: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "iterations_per_epoch", "val_iterations_per_epoch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"nnunetv2.{name} must be a positive integer or null, got {value!r}")
        if not isinstance(self.dataset_id, int) or not 1 <= self.dataset_id <= 999:
            raise ValueError(f"nnunetv2.dataset_id must be an integer within [1, 999], got {self.dataset_id!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"nnunetv2.device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        if not isinstance(self.preprocessing_processes, int) or self.preprocessing_processes < 1:
            raise ValueError(f"nnunetv2.preprocessing_processes must be >= 1, got {self.preprocessing_processes!r}")
        if self.augmentation_processes is not None and (
            not isinstance(self.augmentation_processes, int) or self.augmentation_processes < 0
        ):
            raise ValueError(f"nnunetv2.augmentation_processes must be >= 0 or null, got {self.augmentation_processes!r}")
        if not 0 < self.tile_step_size <= 1:
            raise ValueError(f"nnunetv2.tile_step_size must be within (0, 1], got {self.tile_step_size!r}")
        for name in ("trainer", "planner"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).isidentifier():
                raise ValueError(f"nnunetv2.{name} must name a class, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, raw: dict | None) -> NNUNetSettings:
        """Settings from a sweep file's ``nnunetv2:`` block; ValueError naming an unknown key."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown nnunetv2 setting(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**raw)

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("nnunetv2.device is 'cuda' but no GPU is visible; set nnunetv2.device: cpu or auto")
        return torch.device(self.device)


def check_trainer_and_planner(settings: NNUNetSettings) -> None:
    """ValueError when nnU-Net knows no trainer or planner class of the given names (needs nnunetv2)."""
    require_nnunetv2()
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    base = Path(nnunetv2.__path__[0])
    for kind, name, folder, module in (
        ("trainer", settings.trainer, base / "training" / "nnUNetTrainer", "nnunetv2.training.nnUNetTrainer"),
        ("planner", settings.planner, base / "experiment_planning", "nnunetv2.experiment_planning"),
    ):
        if recursive_find_python_class(str(folder), name, current_module=module) is None:
            raise ValueError(f"nnunetv2.{kind}: nnU-Net has no {kind} class {name!r} (searched {module})")


# -- the raw dataset -------------------------------------------------------------------------------


def is_brats(datamodule) -> bool:
    """Whether the data module holds BraTS labels (0/1/2/4 read as the TC, WT, ET regions)."""
    return datamodule.name in BRATS_DATA_NAMES or bool(getattr(datamodule, "brats_channels", False))


def check_dataset(datamodule) -> None:
    """ValueError when nnU-Net cannot take the data module's task: a multilabel task other than BraTS has
    overlapping regions that no single label map holds, and nnU-Net trains on label maps."""
    if datamodule.task == "multilabel" and not is_brats(datamodule):
        raise ValueError(
            f"nnunetv2 cannot take {datamodule.name}: its labels are overlapping regions (a multilabel task) and "
            "nnU-Net trains on one label map per case; of the multilabel datasets only BraTS (nested regions in "
            "labels 0/1/2/4, trained region-based) is supported"
        )
    if datamodule.task not in ("multiclass", "multilabel"):
        raise ValueError(f"nnunetv2 cannot take {datamodule.name}: unknown task {datamodule.task!r}")


@dataclass(frozen=True)
class TestCase:
    """One case nnU-Net predicts and the suite scores: ``images`` as nnU-Net reads them (one file per
    channel, ``imagesTs/<case>_<channel>.nii.gz``) and ``label`` as stored (what the score compares to)."""

    case_id: str
    images: tuple[str, ...]
    label: str


def cases_in_test_dir(test_dir: str | Path) -> tuple[TestCase, ...]:
    """The labelled cases of a test folder in nnU-Net's layout (``imagesTs/``, ``labelsTs/``; read by
    :func:`segresmamba.data.external.pair_test_dir`, which says what is wrong with a bad folder)."""
    from segresmamba.data.external import pair_test_dir

    return tuple(TestCase(case_id, tuple(str(f) for f in images), str(label))
                 for case_id, (images, label) in pair_test_dir(test_dir).items())


@dataclass(frozen=True)
class RawDataset:
    """What :func:`export_raw_dataset` wrote."""

    folder: Path
    name: str
    dataset_id: int
    nnunet_fold: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[TestCase, ...]
    region_based: bool

    def manifest(self) -> dict[str, Any]:
        out = asdict(self)
        out["folder"] = str(self.folder)
        return out


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_") or "data"


def _channel_names(datamodule) -> dict[str, str]:
    """``dataset.json`` channel names: ``CT`` turns on nnU-Net's CT normalisation, any other name z-scores."""
    if is_brats(datamodule):
        from segresmamba.data.phantoms import BRATS_CHANNELS

        names = [str(c) for c in BRATS_CHANNELS]
    else:
        names = [str(m) for m in (getattr(datamodule, "modalities", None) or ["MR"] * datamodule.in_channels)]
    if len(names) != datamodule.in_channels:
        raise ValueError(f"{datamodule.name}: {len(names)} modality names for {datamodule.in_channels} channels")
    return {str(i): n for i, n in enumerate(names)}


def _labels(datamodule) -> tuple[dict[str, Any], list[int] | None]:
    """``dataset.json`` labels (and ``regions_class_order`` for BraTS)."""
    if is_brats(datamodule):
        return dict(BRATS_DATASET_LABELS), list(BRATS_REGIONS_CLASS_ORDER)
    names = ["background", *datamodule.class_names]
    if len(names) != datamodule.out_channels:
        raise ValueError(f"{datamodule.name}: {len(names)} label names for {datamodule.out_channels} output channels")
    if len(set(names)) != len(names):
        raise ValueError(f"{datamodule.name}: label names repeat ({names}); dataset.json needs unique names")
    return {name: i for i, name in enumerate(names)}, None


def _link(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    os.symlink(Path(source).resolve(), dest)


def _save(data: np.ndarray, affine: np.ndarray, dest: Path, dtype) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), np.asarray(affine, dtype=np.float64)), str(dest))


def _training_label(data: np.ndarray, brats: bool) -> np.ndarray:
    """A label map as nnU-Net trains on it: BraTS's enhancing tumour 4 becomes 3 (consecutive values)."""
    data = np.asarray(data).astype(np.uint8)
    if brats:
        data = np.where(data == BRATS_ENHANCING_STORED, BRATS_ENHANCING_NNUNET, data).astype(np.uint8)
    return data


def _write_training_label(source: Path, dest: Path, brats: bool) -> None:
    """A stored label file into ``labelsTr``: linked as it is, or rewritten for BraTS (:func:`_training_label`)."""
    if not brats:
        _link(source, dest)
        return
    img = nib.load(str(source))
    _save(_training_label(np.asarray(img.dataobj), True), img.affine, dest, np.uint8)


def _channel_files(images: Sequence[Path], channels: int, case_id: str, folder: Path) -> list[str]:
    """One file per channel under ``folder`` (``<case>_<cccc>.nii.gz``): links to files already one per
    channel, a 4D image cut into its channels (the last axis, as the Decathlon stores them)."""
    out = [folder / f"{case_id}_{c:04d}.nii.gz" for c in range(channels)]
    if len(images) == channels:
        for source, dest in zip(images, out):
            _link(Path(source), dest)
        return [str(p) for p in out]
    if len(images) != 1:
        raise ValueError(f"case {case_id}: {len(images)} image files for {channels} channels")
    img = nib.load(str(images[0]))
    if channels == 1 and len(img.shape) == 3:
        _link(Path(images[0]), out[0])
        return [str(out[0])]
    if len(img.shape) != 4 or img.shape[3] != channels:
        raise ValueError(f"case {case_id}: {images[0]} has shape {img.shape}, expected {channels} channels on its last axis")
    data = np.asarray(img.dataobj)
    for c, dest in enumerate(out):
        _save(data[..., c], img.affine, dest, np.float32)
    return [str(p) for p in out]


def _ondisk_cases(datamodule) -> tuple[dict[str, tuple[list[Path], Path]], dict[str, tuple[list[Path], Path]]]:
    """({case id: (image files, label file)} of the labelled training cases, the same of the test cases)."""
    datamodule.split  # validates every case  # noqa: B018
    cases = datamodule._cases  # the validated cases of the fold and the test list
    train = {i: (list(cases[i].images), Path(cases[i].label)) for i in [*datamodule.case_ids("train"), *datamodule.case_ids("val")]}
    if datamodule.test_dir is not None:
        items = datamodule.external_test_items()
    else:
        items = datamodule.items("test")
    test = {}
    for item in items:
        image = item["image"]
        test[item["case_id"]] = ([Path(p) for p in image] if isinstance(image, (list, tuple)) else [Path(image)], Path(item["label"]))
    return train, test


def _all_folds(datamodule, used: set[str]) -> tuple[list[dict[str, list[str]]], int] | None:
    """Every fold of the data module's split file as nnU-Net splits and the index of ours, when the file
    holds folds (a ``kfold`` split file); None otherwise."""
    from segresmamba.data.splits import SPLIT_FORMAT, split_for_fold

    source = Path(getattr(datamodule.split, "source", "") or "")
    if source.suffix != ".json" or not source.is_file():
        return None
    try:
        data = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("format") != SPLIT_FORMAT or data.get("scheme") != "kfold" or not isinstance(data.get("folds"), list):
        return None
    folds = [[c for c in fold if c in used] for fold in data["folds"]]
    splits = []
    for k in range(len(folds)):
        split = split_for_fold(folds, k)
        splits.append({"train": list(split.train), "val": list(split.val)})
    return splits, int(datamodule.fold)


def _write_in_memory(datamodule, raw: Path) -> tuple[dict[str, list[str]], list[TestCase]]:
    """Write an in-memory data module's cases as NIfTI; return ({split: case ids}, test cases).

    MNI152 tissue: the template's slabs cut as stored (raw intensities, the template's affine shifted to
    each slab); other in-memory modules: their arrays on 1 mm voxels (or a MetaTensor's own affine).
    """
    from segresmamba.data.mni152 import MNI152TissueDataModule, mni152_tissue_volumes

    split_ids: dict[str, list[str]] = {"train": [], "val": []}
    arrays: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"train": {}, "val": {}, "test": {}}
    if isinstance(datamodule, MNI152TissueDataModule):
        datamodule.setup("fit")
        image, label, affine = mni152_tissue_volumes(datamodule.resolution)
        image_nii, label_nii = nib.Nifti1Image(image, affine), nib.Nifti1Image(label, affine)

        def slab(a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            index = [slice(None)] * 3
            index[datamodule.axis_index] = slice(a, b)
            cut_image, cut_label = image_nii.slicer[tuple(index)], label_nii.slicer[tuple(index)]
            return np.asarray(cut_image.dataobj)[None], np.asarray(cut_label.dataobj)[None], cut_image.affine

        for a, b in datamodule.slabs["train"]:
            arrays["train"][f"mni152_train_{a}-{b}"] = slab(a, b)
        val_id = datamodule.items("val")[0]["case_id"]
        arrays["val"][val_id] = slab(*datamodule.slabs["val"])
        arrays["test"][val_id] = arrays["val"][val_id]
    else:
        for split in ("train", "val", "test"):
            for item in datamodule.items(split):
                img, lab = item["image"], item["label"]
                affine = np.asarray(img.affine) if hasattr(img, "affine") else np.eye(4)
                as_np = lambda x: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)  # noqa: E731
                arrays[split].setdefault(item["case_id"], (as_np(img), as_np(lab), affine))
    tests = []
    for split in ("train", "val", "test"):
        folder, label_folder = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
        for case_id, (img, lab, affine) in arrays[split].items():
            if img.ndim != 4 or lab.ndim != 4 or lab.shape[0] != 1:
                raise ValueError(f"{datamodule.name}: case {case_id} is not (C, X, Y, Z) image and (1, X, Y, Z) label arrays")
            files = [raw / folder / f"{case_id}_{c:04d}.nii.gz" for c in range(img.shape[0])]
            for c, dest in enumerate(files):
                _save(img[c], affine, dest, np.float32)
            label_file = raw / label_folder / f"{case_id}.nii.gz"
            # test labels as stored (what the score compares to), training labels as nnU-Net trains on them
            _save(lab[0] if split == "test" else _training_label(lab[0], is_brats(datamodule)), affine, label_file, np.uint8)
            if split == "test":
                tests.append(TestCase(case_id, tuple(str(f) for f in files), str(label_file)))
            else:
                split_ids[split].append(case_id)
    return split_ids, tests


def export_raw_dataset(datamodule, out_dir: str | Path, dataset_id: int = 500) -> RawDataset:
    """Write the nnU-Net raw dataset of the data module's fold under ``out_dir`` (the ``nnUNet_raw`` folder).

    Writes ``Dataset<id>_<name>/``: ``imagesTr/<case>_<cccc>.nii.gz`` and ``labelsTr/<case>.nii.gz`` for the
    fold's training and validation cases, ``imagesTs/`` for the test cases, ``dataset.json``
    (``channel_names``, ``labels``, ``numTraining``, ``file_ending``, and ``regions_class_order`` for BraTS)
    and ``splits_final.json`` (our split: every fold of a ``kfold`` split file, else our one fold as fold
    0), and returns what it wrote (:class:`RawDataset`; ``nnunet_fold`` is the nnU-Net fold that is ours).
    The ``splits_final.json`` goes to ``nnUNet_preprocessed/<dataset>/`` (where nnU-Net reads it) in
    :func:`run_nnunetv2`; here it sits beside ``dataset.json``.

    Raises:
        ValueError: a task nnU-Net cannot take (:func:`check_dataset`), a bad dataset id, a case in both
            training and validation.
    """
    check_dataset(datamodule)
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer within [1, 999], got {dataset_id!r}")
    name = f"Dataset{dataset_id:03d}_{_slug(datamodule.name)}"
    raw = Path(out_dir) / name
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    channels = datamodule.in_channels
    from segresmamba.data.ondisk import OnDiskDataModule

    if isinstance(datamodule, OnDiskDataModule):
        train_cases, test_cases = _ondisk_cases(datamodule)
        for case_id, (images, label) in train_cases.items():
            _channel_files(images, channels, case_id, raw / "imagesTr")
            _write_training_label(label, raw / "labelsTr" / f"{case_id}.nii.gz", is_brats(datamodule))
        tests = [
            TestCase(case_id, tuple(_channel_files(images, channels, case_id, raw / "imagesTs")), str(label.resolve()))
            for case_id, (images, label) in test_cases.items()
        ]
        split_ids = {"train": datamodule.case_ids("train"), "val": datamodule.case_ids("val")}
        folds = _all_folds(datamodule, set(train_cases))
    else:
        split_ids, tests = _write_in_memory(datamodule, raw)
        folds = None
    overlap = sorted(set(split_ids["train"]) & set(split_ids["val"]))
    if overlap:
        raise ValueError(f"{datamodule.name}: case(s) in both training and validation: {overlap}")
    if folds is None:
        folds, ours = [{"train": sorted(split_ids["train"]), "val": sorted(split_ids["val"])}], 0
    else:
        folds, ours = folds
    labels, regions_order = _labels(datamodule)
    dataset_json = {
        "name": name,
        "description": f"{datamodule.name} ({datamodule.provenance}), exported by segresmamba for nnU-Net v2",
        "channel_names": _channel_names(datamodule),
        "labels": labels,
        "numTraining": len(list((raw / "labelsTr").glob("*.nii.gz"))),
        "file_ending": ".nii.gz",
        **({"regions_class_order": regions_order} if regions_order else {}),
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    (raw / "splits_final.json").write_text(json.dumps(folds, indent=2))
    return RawDataset(
        folder=raw, name=name, dataset_id=dataset_id, nnunet_fold=ours, train=tuple(folds[ours]["train"]),
        val=tuple(folds[ours]["val"]), test=tuple(tests), region_based=regions_order is not None,
    )


# -- scoring ---------------------------------------------------------------------------------------


def _scored_channels(label: np.ndarray, datamodule, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """A label map (X, Y, Z) -> the scored classes as 0/1 channels (1, n_scored, X, Y, Z): one-hot without
    background (multiclass), or the BraTS ``regions`` [TC, WT, ET] as sets of label values."""
    volume = torch.as_tensor(np.asarray(label).astype(np.int64))[None, None]
    if is_brats(datamodule):
        return torch.stack([torch.isin(volume[:, 0], torch.tensor(r)) for r in regions], 1).float()
    return label_to_onehot(volume, "multiclass", datamodule.out_channels)


def score_predictions(prediction_dir: str | Path, cases: Sequence[TestCase], datamodule) -> tuple[dict[str, float], list[dict]]:
    """Dice and HD95 of nnU-Net's masks (``<prediction_dir>/<case>.nii.gz``) against the labels as stored,
    on each scan's own grid (:mod:`segresmamba.metrics`); returns (``test/dice_*`` and ``test/hd95_*`` means
    per class and overall, one row per case and class as in ``test_cases.csv``)."""
    prediction_dir = Path(prediction_dir)
    dice_rows, hd_rows, rows = [], [], []
    for case in cases:
        path = prediction_dir / f"{case.case_id}.nii.gz"
        if not path.is_file():
            raise ValueError(f"nnU-Net wrote no prediction for case {case.case_id} ({path})")
        pred_nii, label_nii = nib.load(str(path)), nib.load(case.label)
        if pred_nii.shape[:3] != label_nii.shape[:3] or not np.allclose(pred_nii.affine, label_nii.affine, atol=1e-3):
            raise ValueError(
                f"case {case.case_id}: nnU-Net's mask {path} (shape {pred_nii.shape}) is not on the grid of the stored "
                f"label {case.label} (shape {label_nii.shape})"
            )
        pred = _scored_channels(np.asarray(pred_nii.dataobj), datamodule, BRATS_NNUNET_REGIONS)
        truth = _scored_channels(np.asarray(label_nii.dataobj), datamodule, BRATS_STORED_REGIONS)
        spacing = [float(s) for s in label_nii.header.get_zooms()[:3]]
        dice, hd95 = dice_per_class(pred, truth).float(), hd95_per_class(pred, truth, spacing)
        dice_rows.append(dice)
        hd_rows.append(hd95)
        rows += case_rows([case.case_id], datamodule.class_names, dice, hd95, "original", [spacing])
    empty = torch.empty(0, len(datamodule.class_names))
    results = summarise("test", datamodule.class_names,
                        {"dice": torch.cat(dice_rows) if dice_rows else empty, "hd95": torch.cat(hd_rows) if hd_rows else empty})
    # a class scored on no case has no mean: None in the record, as the suite's own runs write it
    return {k: (None if math.isnan(v) else v) for k, v in results.items()}, rows


# -- the run ---------------------------------------------------------------------------------------


def plan_summary(plans: dict, configuration: str = CONFIGURATION) -> dict[str, Any]:
    """What nnU-Net's plan chose for ``configuration``: patch, spacing, batch, normalisation, network stages."""
    config = (plans.get("configurations") or {}).get(configuration)
    if config is None:
        raise ValueError(f"nnU-Net's plans have no configuration {configuration!r} (have {list(plans.get('configurations') or {})})")
    arch = config.get("architecture") or {}
    kwargs = arch.get("arch_kwargs") or {}
    return {
        "plans_name": plans.get("plans_name"),
        "configuration": configuration,
        "patch_size": config.get("patch_size"),
        "spacing": config.get("spacing"),
        "batch_size": config.get("batch_size"),
        "normalization": config.get("normalization_schemes"),
        "use_mask_for_norm": config.get("use_mask_for_norm"),
        "network": arch.get("network_class_name"),
        "n_stages": kwargs.get("n_stages"),
        "features_per_stage": kwargs.get("features_per_stage"),
        "strides": kwargs.get("strides"),
        "kernel_sizes": kwargs.get("kernel_sizes"),
        "median_image_size_in_voxels": config.get("median_image_size_in_voxels"),
        "transpose_forward": plans.get("transpose_forward"),
    }


def _energy_tracker(energy: dict | None, out: Path):
    """The suite's codecarbon wrapper started on ``out`` (None when not configured)."""
    if energy is None:
        return None, None
    tracker = EnergyTracker(**{"output_dir": str(out), **energy})
    host = SimpleNamespace(is_global_zero=True, log_dir=str(out), default_root_dir=str(out))  # what the callback reads of a trainer
    tracker.on_fit_start(host, None)
    return tracker, host


def _wipe(work_dir: Path) -> None:
    for folder in (*NNUNET_FOLDERS, "predictions"):
        if (work_dir / folder).exists():
            shutil.rmtree(work_dir / folder)


def set_environment(work_dir: Path, settings: NNUNetSettings) -> None:
    """nnU-Net's folders under ``work_dir`` and its process settings, in this process's environment (to be
    called before nnunetv2's modules are imported)."""
    for folder in NNUNET_FOLDERS:
        os.environ[folder] = str(work_dir / folder)
    os.environ["nnUNet_compile"] = "true" if settings.compile else "false"


def predict_cases(
    model_folder: str | Path, nnunet_fold: int, cases: Sequence[TestCase], prediction_dir: str | Path,
    settings: NNUNetSettings, device: torch.device | None = None,
) -> Path:
    """nnU-Net's masks of ``cases`` (``<prediction_dir>/<case>.nii.gz``, each on its scan's own grid) from the
    final checkpoint of ``fold_<nnunet_fold>`` of a trained model folder, by ``nnUNetPredictor`` with the
    settings' sliding-window overlap, mirroring and worker counts; returns ``prediction_dir``.

    Raises:
        ValueError: nnunetv2 is not installed, or the model folder has no final checkpoint of that fold.
    """
    require_nnunetv2()
    checkpoint = Path(model_folder) / f"fold_{nnunet_fold}" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        raise ValueError(f"no nnU-Net checkpoint {checkpoint}: the nnunetv2 run did not finish, or its run folder was removed")
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = device if device is not None else settings.torch_device()
    prediction_dir = Path(prediction_dir)
    predictor = nnUNetPredictor(tile_step_size=settings.tile_step_size, use_mirroring=settings.use_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(nnunet_fold,), checkpoint_name=checkpoint.name)
    predictor.predict_from_files([list(c.images) for c in cases], [str(prediction_dir / c.case_id) for c in cases],
                                 save_probabilities=False, overwrite=True, num_processes_preprocessing=settings.preprocessing_processes,
                                 num_processes_segmentation_export=settings.preprocessing_processes)
    return prediction_dir


def nnunet_provenance(device: torch.device, version: str) -> dict[str, Any]:
    """The suite's provenance of an nnU-Net fit or prediction on ``device`` (nnU-Net autocasts on a GPU)."""
    from segresmamba.provenance import provenance

    prov = provenance(device, "16-mixed (nnU-Net autocast)" if device.type == "cuda" else "32 (nnU-Net on CPU)")
    prov["versions"]["nnunetv2"] = version
    return prov


def run_nnunetv2(datamodule, work_dir: str | Path, settings: NNUNetSettings, energy: dict | None = None) -> dict[str, Any]:
    """Export, plan, preprocess, train ``3d_fullres``, predict the test cases and score them; return the
    run record (the ``metrics.json`` shape of :class:`segresmamba.callbacks.RunRecorder`).

    Call it in a process whose environment :func:`set_environment` set before nnunetv2 was imported (as
    :func:`main` does). ``energy``: :class:`~segresmamba.callbacks.EnergyTracker` settings, or None.
    """
    version = require_nnunetv2()
    check_dataset(datamodule)
    work_dir = Path(work_dir).resolve()
    expected = {f: str(work_dir / f) for f in NNUNET_FOLDERS}
    wrong = {f: os.environ.get(f) for f in NNUNET_FOLDERS if os.environ.get(f) != expected[f]}
    if wrong:
        raise ValueError(f"nnU-Net's folders must be set to {work_dir}/<folder> before the run (set_environment); got {wrong}")
    device = settings.torch_device()
    _wipe(work_dir)
    t_start = time.perf_counter()
    raw = export_raw_dataset(datamodule, work_dir / "nnUNet_raw", settings.dataset_id)

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.run.run_training import get_trainer_from_args

    check_trainer_and_planner(settings)
    t0 = time.perf_counter()
    extract_fingerprints([raw.dataset_id], num_processes=settings.preprocessing_processes, check_dataset_integrity=True,
                         clean=True, verbose=False, show_progress_bar=False)
    plans_name = plan_experiments([raw.dataset_id], settings.planner)
    preprocess([raw.dataset_id], plans_name, configurations=(CONFIGURATION,), num_processes=(settings.preprocessing_processes,),
               verbose=False, show_progress_bar=False)
    preprocessed = work_dir / "nnUNet_preprocessed" / raw.name
    shutil.copy(raw.folder / "splits_final.json", preprocessed / "splits_final.json")
    plan_s = time.perf_counter() - t0

    plans = load_json(str(preprocessed / f"{plans_name}.json"))
    if settings.augmentation_processes is not None:
        # set only now: nnU-Net's planner also sizes its torch threads by this variable, and 0 breaks it
        os.environ["nnUNet_n_proc_DA"] = str(settings.augmentation_processes)
    trainer = get_trainer_from_args(raw.name, CONFIGURATION, raw.nnunet_fold, settings.trainer, plans_name, device=device)
    for attribute, value in (("num_epochs", settings.epochs), ("num_iterations_per_epoch", settings.iterations_per_epoch),
                             ("num_val_iterations_per_epoch", settings.val_iterations_per_epoch)):
        if value is not None:
            setattr(trainer, attribute, value)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracker, host = _energy_tracker(energy, work_dir)
    t0 = time.perf_counter()
    trainer.run_training()
    fit_s = time.perf_counter() - t0
    if tracker is not None:
        tracker.on_fit_end(host, None)
    peak = (torch.cuda.max_memory_allocated(device) / 1024**3, torch.cuda.max_memory_reserved(device) / 1024**3) if device.type == "cuda" else (None, None)
    params = sum(p.numel() for p in trainer.network.parameters())
    iterations = int(trainer.num_iterations_per_epoch)
    if settings.run_validation:
        trainer.perform_actual_validation(False)
    log = trainer.logger.get_checkpoint()  # nnU-Net's own per-epoch log
    epoch_s = [b - a for a, b in zip(log.get("epoch_start_timestamps", []), log.get("epoch_end_timestamps", []))]
    model_folder = Path(trainer.output_folder_base)
    del trainer

    t0 = time.perf_counter()
    prediction_dir = work_dir / "predictions"
    predict_cases(model_folder, raw.nnunet_fold, raw.test, prediction_dir, settings, device)
    test, rows = score_predictions(prediction_dir, raw.test, datamodule)
    predict_s = time.perf_counter() - t0

    return {
        "model": MODEL,
        "recipe": RECIPE,
        "recipe_settings": {"name": RECIPE, **asdict(settings)},
        "reported_checkpoint": "last",
        "params": params,
        # the data module's own training settings (recipe, iterations) are not what nnU-Net trained with
        "data": {k: v for k, v in datamodule.describe().items() if k not in ("recipe", "iterations_per_epoch")},
        "provenance": nnunet_provenance(device, version),
        "fit": {
            "epochs": len(epoch_s),
            "global_steps": len(epoch_s) * iterations,
            "wall_time_s": fit_s,
            "median_step_ms": None,
            "epoch_time_s": epoch_s,
            "peak_memory_allocated_gib": peak[0],
            "peak_memory_reserved_gib": peak[1],
            "energy": tracker.result if tracker is not None else None,
            "val_history": [],
            "untrained": None,
            "best": None,
            "last": None,
            "reported": "last",
            "interrupted": False,
            "nnunet_pseudo_dice": [float(x) for x in log.get("mean_fg_dice", [])],
            "nnunet_train_loss": [float(x) for x in log.get("train_losses", [])],
        },
        "test": {**test, "ckpt_path": str(model_folder / f"fold_{raw.nnunet_fold}" / "checkpoint_final.pth"),
                 "reported_checkpoint": "last", "eval_space": "original", "num_cases": len(raw.test), "rows": rows},
        "nnunet": {
            "version": version, "plan": plan_summary(plans), "trainer": settings.trainer, "planner": settings.planner,
            "dataset": raw.manifest(), "model_folder": str(model_folder), "plan_and_preprocess_s": plan_s,
            "predict_and_score_s": predict_s, "total_s": time.perf_counter() - t_start,
        },
    }


def write_record(record: dict[str, Any], path: Path) -> None:
    """``path`` (the run record) and ``test_cases.csv`` beside it, from :func:`run_nnunetv2`'s record."""
    rows = record.get("test", {}).pop("rows", [])
    path.parent.mkdir(parents=True, exist_ok=True)
    if rows:
        cases = cases_file(path)
        write_case_rows(cases, rows)
        record["test"]["cases_csv"] = str(cases)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


# -- what a sweep runs -----------------------------------------------------------------------------


def energy_settings(stacked: dict[str, Any]) -> dict | None:
    """The :class:`~segresmamba.callbacks.EnergyTracker` settings among stacked CLI settings' callbacks
    (``trainer.callbacks`` or ``trainer.callbacks+``), or None when the sweep measures no energy."""
    trainer = stacked.get("trainer") or {}
    for key in ("callbacks", "callbacks+"):
        for callback in trainer.get(key) or []:
            if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("EnergyTracker"):
                return dict(callback.get("init_args") or {})
    return None


def preflight(data_block: dict, settings: NNUNetSettings) -> None:
    """Before a sweep's first run: nnunetv2 installed, its trainer and planner known, the dataset one nnU-Net
    can take; ValueError saying which is not."""
    require_nnunetv2()
    check_trainer_and_planner(settings)
    from segresmamba.bench.configs import instantiate_datamodule

    check_dataset(instantiate_datamodule(data_block))


def write_run_spec(path: Path, data_block: dict, settings: NNUNetSettings, record: Path, energy: dict | None) -> list[str]:
    """Write what one run needs (``nnunetv2_run.json``) and return the command that runs it."""
    spec = {"data": data_block, "settings": asdict(settings), "record": str(record), "energy": energy, "work_dir": str(path.parent)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2))
    return [sys.executable, "-m", "segresmamba.bench.nnunetv2", str(path)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One nnU-Net v2 run from a run file (see the module docstring).")
    p.add_argument("spec", type=Path, help="the run file (nnunetv2_run.json) a sweep writes")
    args = p.parse_args(argv)
    try:
        spec = json.loads(args.spec.read_text())
        settings = NNUNetSettings.from_dict(spec["settings"])
        work_dir = Path(spec["work_dir"]).resolve()
        set_environment(work_dir, settings)  # before any nnunetv2 module is imported
        require_nnunetv2()
        from segresmamba.bench.configs import instantiate_datamodule

        datamodule = instantiate_datamodule(spec["data"])
        record = run_nnunetv2(datamodule, work_dir, settings, spec.get("energy"))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    write_record(record, Path(spec["record"]))
    print(f"test Dice {record['test']['test/dice_mean']:.4f}; record {spec['record']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
