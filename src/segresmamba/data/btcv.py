"""BTCV abdomen: Multi-Atlas Labeling Beyond the Cranial Vault (Landman et al. 2015, MICCAI 2015 workshop
challenge; Synapse syn3193805)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from monai.transforms import Compose

from segresmamba.data.ondisk import OnDiskDataModule
from segresmamba.data.phantoms import BTCV_ORGANS
from segresmamba.data.splits import Split, default_split_path, load_or_create_split
from segresmamba.data.transforms import ct_eval_transforms, ct_train_transforms
from segresmamba.data.validation import CaseFiles, is_hidden, require_directory
from segresmamba.errors import InputError

__all__ = ["BTCVDataModule"]

_IMG = re.compile(r"^img(\d+)\.nii(\.gz)?$")


def _case_id_of(path: str | Path) -> str:
    """``img0001.nii.gz`` -> ``0001``; any other name -> the name without ``.nii``/``.nii.gz``."""
    name = Path(path).name
    match = _IMG.match(name)
    return match.group(1) if match else re.sub(r"\.nii(\.gz)?$", "", name)


class BTCVDataModule(OnDiskDataModule):
    """BTCV abdominal CT: 30 labelled volumes, 13 organs + background (14 output channels), "multiclass".

    On disk, either the raw Synapse layout (``root`` may also be ``RawData/`` or its parent, which hold
    ``Training/img`` and ``Training/label``)::

        <root>/img/imgXXXX.nii.gz   <root>/label/labelXXXX.nii.gz

    or a MONAI-style datalist json (``datalist_json``, e.g. the SwinUNETR ``dataset_0.json``) with
    ``"training"`` and ``"validation"`` lists of ``{"image": ..., "label": ...}``, paths relative to the json
    (an optional ``"test"`` list is used as a labelled test set only if its entries carry labels).

    Classes: labels 1..13 are :data:`~segresmamba.data.phantoms.BTCV_ORGANS` (spleen, right kidney, left
    kidney, gallbladder, esophagus, liver, stomach, aorta, inferior vena cava, portal and splenic veins,
    pancreas, right adrenal gland, left adrenal gland); ``class_names`` lists these 13 and Dice is averaged
    over them (background is not scored). Organs absent from a case (e.g. a removed gallbladder) have no
    defined Dice for that case: they count as NaN and are left out of the means (NaN-aware), which MONAI
    ``DiceMetric(ignore_empty=True, reduction="mean_batch")`` does.

    Transforms (MONAI UNETR/SwinUNETR BTCV tutorial; the paper names ScaleIntensityRange, Orientation,
    CropForeground, Spacing): load, channel first, RAS, Spacing ``spacing`` (bilinear/nearest), window
    ``intensity_window`` HU -> [0, 1] clipped, CropForeground, RandCropByPosNegLabel ``num_samples``
    patches per volume (pos 1 : neg 1), flips and rot90 with p=0.1, RandShiftIntensity 0.1. Evaluation is
    the deterministic part on the whole resampled volume. A training batch holds
    ``batch_size * num_samples`` patches. Patch: 96 (the tutorial); the paper's memory figures use 128.
    With ``recipe: nnunet``: RAS, the plan's spacing and CT normalisation (foreground 0.5/99.5 percentile
    clip, foreground z-score) unless ``spacing`` / ``intensity_window`` are set, nnU-Net's augmentation.

    Splits: ``split="auto"`` uses the datalist's training/validation lists when ``datalist_json`` is given,
    else a seeded 24/6 holdout (``num_val`` = 6); ``"holdout"`` forces the seeded holdout and ``"kfold"`` a
    seeded ``num_folds``-fold split over every labelled case (``fold`` selects the validation fold). The
    test split is the validation split unless the datalist has a labelled test list.

    Args:
        root: dataset folder.
        fold: validation fold (``kfold`` only; 0 otherwise).
        split: "auto", "holdout", "kfold" (see above).
        num_val: validation cases of the holdout split.
        num_folds: folds of the kfold split.
        datalist_json: datalist json path (absolute or relative to ``root``); ``None`` globs img/label.
        spacing: target voxel size in mm; ``None``: the recipe's (``paper``: the tutorial's 1.5, 1.5, 2.0;
            ``nnunet``: the plan's).
        intensity_window: HU window mapped to [0, 1]; ``None``: the recipe's (``paper``: the tutorial's
            -175, 250; ``nnunet``: the plan's CT normalisation).
        num_samples: patches per volume per step (tutorial: 4).
        kwargs: the settings every on-disk dataset shares: ``seed``, ``split_file``, ``check_voxels``,
            ``skip_bad_cases`` (:class:`~segresmamba.data.ondisk.OnDiskDataModule`) and ``patch_size``,
            ``batch_size``, ``num_workers``, ``cache_rate``, ``test_dir``, ``predict_dir``, ``empty_labels``, ``recipe``,
            ``iterations_per_epoch`` (:class:`~segresmamba.data.base.VolumeDataModule`); the patch defaults to 96.
    """

    in_channels = 1
    out_channels = 14
    task = "multiclass"
    class_names = list(BTCV_ORGANS)
    name = "btcv"
    default_patch_size = 96
    modalities = ["CT"]
    paper_spacing = (1.5, 1.5, 2.0)
    paper_window = (-175.0, 250.0)

    def __init__(
        self,
        root: str = "data/BTCV",
        fold: int = 0,
        split: Literal["auto", "holdout", "kfold"] = "auto",
        num_val: int = 6,
        num_folds: int = 5,
        datalist_json: str | None = None,
        spacing: tuple[float, float, float] | None = None,
        intensity_window: tuple[float, float] | None = None,
        num_samples: int = 4,
        **kwargs,
    ) -> None:
        super().__init__(root=root, fold=fold, **kwargs)
        if split not in ("auto", "holdout", "kfold"):
            raise InputError(f"split must be 'auto', 'holdout' or 'kfold', got {split!r}")
        if split != "kfold" and fold != 0:
            raise InputError(f"fold={fold} needs split: kfold (a holdout or datalist split has only fold 0)")
        if split == "kfold" and not 0 <= fold < num_folds:
            raise InputError(f"fold must be within [0, {num_folds - 1}], got {fold}")
        if num_samples < 1:
            raise InputError(f"num_samples must be >= 1, got {num_samples}")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise InputError(f"spacing must be three positive numbers or null, got {spacing}")
        if intensity_window is not None and (len(intensity_window) != 2 or intensity_window[0] >= intensity_window[1]):
            raise InputError(f"intensity_window must be (low, high) with low < high, or null, got {intensity_window}")
        self.split_scheme = split
        self.num_val = num_val
        self.num_folds = num_folds
        self.datalist_json = datalist_json
        self.spacing_override = None if spacing is None else tuple(float(s) for s in spacing)
        self.window_override = None if intensity_window is None else tuple(float(w) for w in intensity_window)
        self.spacing = self.spacing_override or self.paper_spacing  # the paper recipe's settings
        self.intensity_window = self.window_override or self.paper_window
        self.num_samples = num_samples
        self._datalist_split: tuple[list[str], list[str]] | None = None

    # -- discovery ---------------------------------------------------------------------------------
    def _datalist_path(self) -> Path:
        assert self.datalist_json is not None
        path = Path(self.datalist_json).expanduser()
        if not path.is_absolute() and not path.is_file() and (self.root / path).is_file():
            path = self.root / path
        if not path.is_file():
            raise InputError(f"{self.name}: datalist_json {self.datalist_json} does not exist")
        return path

    def _case(self, case_id: str, image: Path, label: Path) -> CaseFiles:
        return CaseFiles(
            case_id=case_id, images=(image,), label=label, channels=1,
            label_values=frozenset(range(len(BTCV_ORGANS) + 1)),
        )

    def _from_datalist(self) -> tuple[list[CaseFiles], list[CaseFiles]]:
        path = self._datalist_path()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{self.name}: cannot read datalist {path}: {err}") from None
        base = path.parent

        def entries(key: str, required: bool) -> list[CaseFiles]:
            raw = data.get(key, [])
            if not isinstance(raw, list) or (required and not raw):
                raise InputError(f"{self.name}: datalist {path} needs a non-empty '{key}' list")
            out = []
            for n, entry in enumerate(raw):
                if not isinstance(entry, dict) or "image" not in entry:
                    if key == "test":  # Decathlon-style unlabelled test list (path strings)
                        continue
                    raise InputError(f"{self.name}: datalist {path}: '{key}' entry {n} needs 'image' and 'label'")
                if "label" not in entry:
                    if key == "test":
                        continue
                    raise InputError(f"{self.name}: datalist {path}: '{key}' entry {n} needs a 'label'")
                if is_hidden(entry["image"]):
                    continue
                image = (base / entry["image"]).resolve()
                out.append(self._case(_case_id_of(image), image, (base / entry["label"]).resolve()))
            return out

        train, val, test = entries("training", True), entries("validation", False), entries("test", False)
        ids = [c.case_id for c in train + val + test]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise InputError(f"{self.name}: datalist {path} lists case(s) more than once: {dupes}")
        self._datalist_split = ([c.case_id for c in train], [c.case_id for c in val])
        return train + val, test

    def _from_folders(self) -> tuple[list[CaseFiles], list[CaseFiles]]:
        root = require_directory(self.root, self.name, "set data.init_args.root to the folder holding img/ and label/")
        for candidate in (root, root / "Training", root / "RawData" / "Training"):
            if (candidate / "img").is_dir():
                root = candidate
                break
        else:
            raise InputError(
                f"{self.name}: no img/ folder in {self.root}: expected img/imgXXXX.nii.gz and "
                "label/labelXXXX.nii.gz, or pass datalist_json"
            )
        images = sorted(p for p in (root / "img").iterdir() if _IMG.match(p.name) and not is_hidden(p))
        if not images:
            raise InputError(f"{self.name}: no cases found in {root / 'img'}: expected files named imgXXXX.nii.gz")
        cases = []
        for image in images:
            cid = _case_id_of(image)
            suffix = ".nii.gz" if image.name.endswith(".gz") else ".nii"
            cases.append(self._case(cid, image, root / "label" / f"label{cid}{suffix}"))
        return cases, []

    def discover(self) -> tuple[list[CaseFiles], list[CaseFiles]]:
        if self.datalist_json is not None:
            require_directory(self.root, self.name, "set data.init_args.root to the BTCV folder")
            return self._from_datalist()
        return self._from_folders()

    def make_split(self, case_ids: list[str]) -> Split:
        if self.split_scheme == "auto" and self._datalist_split is not None:
            train, val = self._datalist_split
            if not val:
                raise InputError(f"{self.name}: datalist {self.datalist_json} has no 'validation' list; use split: holdout or kfold")
            return Split(train=sorted(train), val=sorted(val), source=str(self._datalist_path()))
        scheme = "kfold" if self.split_scheme == "kfold" else "holdout"
        path = self.split_file or default_split_path(self.root, self.name, scheme, self.seed, self.num_folds, self.num_val)
        return load_or_create_split(
            case_ids, dataset=self.name, scheme=scheme, fold=self.fold, num_folds=self.num_folds,
            num_val=self.num_val, seed=self.seed, path=path, write=False,
        )

    # -- transforms --------------------------------------------------------------------------------
    def train_transforms(self) -> Compose:
        if self.uses_plan:
            return self.planned_transforms(train=True)
        return ct_train_transforms(self.patch_size, self.spacing, self.intensity_window, self.num_samples)

    def eval_transforms(self) -> Compose:
        if self.uses_plan:
            return self.planned_transforms(train=False)
        return ct_eval_transforms(self.spacing, self.intensity_window)
