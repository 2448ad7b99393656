"""BraTS 2021 (Baid et al. 2021, "The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation
and Radiogenomic Classification", arXiv:2107.02314)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from monai.transforms import Compose

from segresmamba.data.ondisk import OnDiskDataModule
from segresmamba.data.phantoms import BRATS_CHANNELS
from segresmamba.data.splits import (
    Split,
    default_split_path,
    folds_from_assignment,
    load_or_create_split,
    read_brats_folds,
    split_for_fold,
)
from segresmamba.data.transforms import brats_eval_transforms, brats_train_transforms
from segresmamba.data.validation import CaseFiles, is_hidden, require_directory
from segresmamba.errors import InputError

__all__ = ["BraTS2021DataModule", "BRATS_LABELS"]

BRATS_LABELS = frozenset({0, 1, 2, 4})
"""BraTS 2021 label values: 0 background, 1 necrotic tumour core, 2 peritumoral edema, 4 enhancing
tumour. There is no label 3."""

_CASE_DIR = re.compile(r"^BraTS")


class BraTS2021DataModule(OnDiskDataModule):
    """BraTS 2021 adult glioma mpMRI: 1,251 labelled cases, 4 channels -> 3 overlapping tumour regions.

    On disk (the Synapse "TrainingData" folder; ``root`` may also be its parent)::

        <root>/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz

    Input channels are always stacked in :data:`~segresmamba.data.phantoms.BRATS_CHANNELS` order:
    ``[flair, t1, t1ce, t2]``, whatever order a folds file lists them in. Images to predict (``predict_dir``) are named
    nnU-Net's way, ``<case>_0000.nii.gz`` to ``<case>_0003.nii.gz`` in that order. Labels 0/1/2/4 become three
    overlapping binary regions with MONAI ``ConvertToMultiChannelBasedOnBratsClassesd``, channel order
    ``[TC, WT, ET]``: TC (tumour core) = {1, 4}, WT (whole tumour) = {1, 2, 4}, ET (enhancing) = {4};
    task "multilabel" (sigmoid per region), mean Dice = mean of TC, WT, ET.

    Transforms follow the paper (App. A.1): training = load, regions, CropForeground(k_divisible=patch),
    RandSpatialCrop(patch), flips on 3 axes, NormalizeIntensity(nonzero, channel_wise),
    RandScaleIntensity 0.1, RandShiftIntensity 0.1; evaluation = load, regions, normalisation on the whole
    240x240x155 volume (no crop). With ``recipe: nnunet``: RAS, the plan's spacing and per-image z-score
    (over the nonzero voxels, BraTS being skull-stripped), nnU-Net's augmentation, one patch per volume.

    Splits: 5-fold cross-validation. With ``folds_json`` the public ``brats21_folds.json`` of the MONAI
    SwinUNETR BraTS21 recipe (the split the paper used) is read; otherwise a seeded 5-fold split is written
    to ``split_file`` (default ``<root>/splits/brats2021_kfold5_seed<seed>.json``). Validation = fold
    ``fold``, training = the other folds; BraTS 2021 has no public labelled test set, so the test split is
    the validation fold.

    Args:
        root: folder holding the ``BraTS2021_XXXXX`` case folders.
        fold: validation fold, 0-based.
        num_folds: folds of a computed split (a folds file brings its own).
        folds_json: path to ``brats21_folds.json`` (absolute, or relative to the working directory or
            ``root``); ``None`` computes a seeded split.
        kwargs: the settings every on-disk dataset shares: ``seed``, ``split_file``, ``check_voxels``,
            ``skip_bad_cases`` (:class:`~segresmamba.data.ondisk.OnDiskDataModule`) and ``patch_size``,
            ``batch_size``, ``num_workers``, ``cache_rate``, ``test_dir``, ``predict_dir``, ``empty_labels``, ``recipe``,
            ``iterations_per_epoch`` (:class:`~segresmamba.data.base.VolumeDataModule`); the patch defaults to the paper's
            128 (the paper trained with batch 4).
    """

    in_channels = 4
    out_channels = 3
    task = "multilabel"
    class_names = ["TC", "WT", "ET"]
    name = "brats2021"
    default_patch_size = 128
    modalities = ["MR"] * len(BRATS_CHANNELS)
    label_dtype = torch.float32
    brats_channels = True

    def __init__(
        self,
        root: str = "data/BraTS2021",
        fold: int = 0,
        num_folds: int = 5,
        folds_json: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root=root, fold=fold, **kwargs)
        if num_folds < 2:
            raise InputError(f"num_folds must be >= 2, got {num_folds}")
        if folds_json is None and fold >= num_folds:
            raise InputError(f"fold must be within [0, {num_folds - 1}], got {fold}")
        self.num_folds = num_folds
        self.folds_json = folds_json

    def _case_root(self) -> Path:
        root = require_directory(
            self.root, self.name, "set data.init_args.root to the folder holding BraTS2021_XXXXX case folders"
        )
        if not any(self._case_dirs(root)) and (root / "TrainingData").is_dir():
            return root / "TrainingData"
        return root

    @staticmethod
    def _case_dirs(root: Path) -> list[Path]:
        return sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p) and _CASE_DIR.match(p.name))

    @staticmethod
    def _file(folder: Path, stem: str) -> Path:
        gz = folder / f"{stem}.nii.gz"
        plain = folder / f"{stem}.nii"
        return plain if not gz.exists() and plain.exists() else gz

    def _case(self, folder: Path) -> CaseFiles:
        case = folder.name
        return CaseFiles(
            case_id=case,
            images=tuple(self._file(folder, f"{case}_{ch}") for ch in BRATS_CHANNELS),
            label=self._file(folder, f"{case}_seg"),
            channels=len(BRATS_CHANNELS),
            label_values=BRATS_LABELS,
        )

    def discover(self) -> tuple[list[CaseFiles], list[CaseFiles]]:
        root = self._case_root()
        cases = [self._case(d) for d in self._case_dirs(root)]
        if not cases:
            raise InputError(
                f"{self.name}: no cases found in {root}: expected folders named BraTS2021_XXXXX holding "
                f"BraTS2021_XXXXX_{{{','.join(BRATS_CHANNELS)},seg}}.nii.gz"
            )
        return cases, []

    def _folds_path(self) -> Path:
        assert self.folds_json is not None
        path = Path(self.folds_json).expanduser()
        if not path.is_file() and not path.is_absolute() and (self.root / path).is_file():
            path = self.root / path
        if not path.is_file():
            raise InputError(f"{self.name}: folds_json {self.folds_json} does not exist")
        return path

    def make_split(self, case_ids: list[str]) -> Split:
        if self.folds_json is None:
            path = self.split_file or default_split_path(self.root, self.name, "kfold", self.seed, self.num_folds)
            return load_or_create_split(
                case_ids, dataset=self.name, scheme="kfold", fold=self.fold, num_folds=self.num_folds,
                seed=self.seed, path=path, write=False,
            )
        path = self._folds_path()
        assignment = read_brats_folds(path)
        on_disk = set(case_ids)
        absent = sorted(set(assignment) - on_disk)
        if absent:
            shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
            msg = f"{self.name}: {len(absent)} case(s) listed in {path} have no folder in {self.root}: {shown}"
            if not self.skip_bad_cases:
                raise InputError(msg + " (set skip_bad_cases: true to skip them)")
            warnings.warn(msg + "; skipping them", stacklevel=2)
            self.skipped_cases += [{"case_id": case, "reason": f"listed in {path} but has no folder in {self.root}"} for case in absent]
        self._warn_unlisted(self.name, str(path), sorted(on_disk - set(assignment)))
        folds = [[c for c in f if c in on_disk] for f in folds_from_assignment(assignment)]
        return split_for_fold(folds, self.fold, source=str(path))

    def train_transforms(self) -> Compose:
        if self.uses_plan:
            return self.planned_transforms(train=True)
        return brats_train_transforms(self.patch_size)

    def eval_transforms(self) -> Compose:
        if self.uses_plan:
            return self.planned_transforms(train=False)
        return brats_eval_transforms()
