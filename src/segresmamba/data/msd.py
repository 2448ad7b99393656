"""Medical Segmentation Decathlon datasets (Antonelli et al. 2022, "The Medical Segmentation Decathlon",
Nature Communications 13:4128), read through their ``dataset.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from monai.transforms import Compose

from segresmamba.data.ondisk import OnDiskDataModule
from segresmamba.data.splits import Split, default_split_path, load_or_create_split, read_json_object
from segresmamba.data.transforms import ct_eval_transforms, ct_train_transforms
from segresmamba.data.validation import CaseFiles, is_hidden, require_directory
from segresmamba.errors import InputError

__all__ = ["MSDDataModule", "read_decathlon_json"]

CT_DEFAULT_WINDOW = (-175.0, 250.0)


def read_decathlon_json(path: str | Path) -> dict:
    """Read and check a Decathlon ``dataset.json`` (``modality``, ``labels``, ``training`` list)."""
    path = Path(path)
    data = read_json_object(path, "dataset json")
    for key in ("modality", "labels"):
        if not isinstance(data.get(key), dict) or not data[key]:
            raise InputError(f"dataset json {path}: '{key}' must be a non-empty object like {{\"0\": ...}}")
    for key in ("modality", "labels"):
        try:
            numbers = sorted(int(k) for k in data[key])
        except ValueError:
            raise InputError(f"dataset json {path}: '{key}' keys must be integers, got {list(data[key])}") from None
        if numbers != list(range(len(numbers))):
            raise InputError(f"dataset json {path}: '{key}' keys must be 0..{len(numbers) - 1}, got {numbers}")
    if not isinstance(data.get("training"), list) or not data["training"]:
        raise InputError(f"dataset json {path}: needs a non-empty 'training' list")
    return data


class MSDDataModule(OnDiskDataModule):
    """Any Medical Segmentation Decathlon task (or a dataset in its ``dataset.json`` format).

    On disk::

        <root>/dataset.json   <root>/imagesTr/*.nii.gz   <root>/labelsTr/*.nii.gz   [<root>/imagesTs/]

    ``in_channels`` = number of ``modality`` entries, ``out_channels`` = number of ``labels`` entries
    (background included), ``class_names`` = the label names without background; task "multiclass".
    Multi-modal tasks store one 4D ``(X, Y, Z, C)`` image per case (e.g. Task01 BrainTumour); they are
    loaded channel-first. Entries whose file name starts with ``._`` (macOS AppleDouble files, which the
    Decathlon tarballs contain) are ignored. The Decathlon test images have no public labels, so the test
    split is the validation split. ``predict`` writes masks of the test split; to predict the
    Decathlon test images instead, set ``predict_dir: <root>/imagesTs``.

    Transforms: the CT recipe of :func:`~segresmamba.data.transforms.ct_train_transforms`: RAS,
    optional resampling to ``spacing``, intensity window -> [0, 1] (``intensity_window``; when ``None``:
    (-175, 250) HU if every modality is CT, else z-score inside the nonzero region, channel-wise),
    CropForeground, RandCropByPosNegLabel ``num_samples`` patches, flips/rot90 p=0.1, RandShiftIntensity.
    With ``recipe: nnunet``: RAS, the plan's spacing and normalisation (an explicit ``spacing`` or
    ``intensity_window`` overrides the plan's), nnU-Net's augmentation
    (:func:`~segresmamba.data.transforms.planned_train_transforms`).

    Splits: ``"holdout"`` (``num_val`` validation cases, seeded) or ``"kfold"`` (``num_folds`` seeded folds,
    ``fold`` validates) over the labelled ``training`` list.

    Args:
        root: the task folder holding ``dataset.json``.
        fold: validation fold (``kfold`` only; 0 otherwise).
        split: "holdout" or "kfold".
        num_val: validation cases of the holdout split (default: a fifth of the cases, at least 1).
        num_folds: folds of the kfold split.
        spacing: target voxel size in mm, or ``None``: the recipe decides (``paper``: the class's
            ``paper_spacing``, for this class each case's own grid; ``nnunet``: the plan's).
        intensity_window: (low, high) mapped to [0, 1] with clipping, or ``None``: the recipe decides
            (``paper``: ``paper_window``, else the default above; ``nnunet``: the plan's normalisation).
        num_samples: patches per volume per step.
        kwargs: the settings every on-disk dataset shares: ``seed``, ``split_file``, ``check_voxels``,
            ``skip_bad_cases`` (:class:`~segresmamba.data.ondisk.OnDiskDataModule`) and ``patch_size``,
            ``batch_size``, ``num_workers``, ``cache_rate``, ``test_dir``, ``predict_dir``, ``empty_labels``, ``recipe``,
            ``iterations_per_epoch`` (:class:`~segresmamba.data.base.VolumeDataModule`); the patch defaults to 96;
            ``test_dir`` scans go through the evaluation chain.
    """

    task = "multiclass"
    name = "msd"
    default_patch_size = 96  # instances: "msd_<task name from dataset.json>", e.g. "msd_braintumour"
    paper_spacing: tuple[float, float, float] | None = None
    paper_window: tuple[float, float] | None = None

    def __init__(
        self,
        root: str = "data/Task09_Spleen",
        fold: int = 0,
        split: Literal["holdout", "kfold"] = "holdout",
        num_val: int | None = None,
        num_folds: int = 5,
        spacing: tuple[float, float, float] | None = None,
        intensity_window: tuple[float, float] | None = None,
        num_samples: int = 4,
        **kwargs,
    ) -> None:
        super().__init__(root=root, fold=fold, **kwargs)
        if split not in ("holdout", "kfold"):
            raise InputError(f"split must be 'holdout' or 'kfold', got {split!r}")
        if split == "holdout" and fold != 0:
            raise InputError(f"fold={fold} needs split: kfold (a holdout split has only fold 0)")
        if split == "kfold" and not 0 <= fold < num_folds:
            raise InputError(f"fold must be within [0, {num_folds - 1}], got {fold}")
        if num_samples < 1:
            raise InputError(f"num_samples must be >= 1, got {num_samples}")
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise InputError(f"spacing must be three positive numbers or null, got {spacing}")
        if intensity_window is not None and (len(intensity_window) != 2 or intensity_window[0] >= intensity_window[1]):
            raise InputError(f"intensity_window must be (low, high) with low < high, got {intensity_window}")
        # the json decides the channel counts, which the model needs before training: read it now
        require_directory(self.root, self.name, "set data.init_args.root to the task folder holding dataset.json")
        self.dataset_json = self.root / "dataset.json"
        if not self.dataset_json.is_file():
            raise InputError(f"{self.name}: no dataset.json in {self.root} (expected a Medical Segmentation Decathlon task folder)")
        self.meta = read_decathlon_json(self.dataset_json)
        self.modalities = [self.meta["modality"][str(i)] for i in range(len(self.meta["modality"]))]
        labels = [self.meta["labels"][str(i)] for i in range(len(self.meta["labels"]))]
        if len(labels) < 2:
            raise InputError(f"{self.name}: {self.dataset_json} declares {len(labels)} label(s); need background and at least one class")
        self.in_channels = len(self.modalities)
        self.out_channels = len(labels)
        self.class_names = [str(n) for n in labels[1:]]
        self.task_name = str(self.meta.get("name", self.root.name))
        if type(self).name == MSDDataModule.name:  # generic adapter: name results after the task
            slug = "".join(ch if ch.isalnum() else "_" for ch in self.task_name.lower()).strip("_")
            self.name = f"msd_{slug or 'task'}"
        self.split_scheme = split
        self.num_val = num_val
        self.num_folds = num_folds
        self.spacing_override = None if spacing is None else tuple(float(s) for s in spacing)
        self.window_override = None if intensity_window is None else tuple(float(w) for w in intensity_window)
        # the paper recipe's settings
        self.spacing = self.spacing_override or self.paper_spacing
        if intensity_window is None:
            intensity_window = self.paper_window
        if intensity_window is None and all(str(m).upper() == "CT" for m in self.modalities):
            intensity_window = CT_DEFAULT_WINDOW
        self.intensity_window = None if intensity_window is None else tuple(float(w) for w in intensity_window)
        self.num_samples = num_samples

    def discover(self) -> tuple[list[CaseFiles], list[CaseFiles]]:
        cases = []
        allowed = frozenset(range(self.out_channels))
        for n, entry in enumerate(self.meta["training"]):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise InputError(f"{self.name}: {self.dataset_json}: training entry {n} needs 'image' and 'label'")
            if is_hidden(entry["image"]) or is_hidden(entry["label"]):
                continue
            image = (self.root / entry["image"]).resolve()
            case_id = image.name.removesuffix(".gz").removesuffix(".nii")
            cases.append(
                CaseFiles(
                    case_id=case_id, images=(image,), label=(self.root / entry["label"]).resolve(),
                    channels=self.in_channels, label_values=allowed,
                )
            )
        if not cases:
            raise InputError(f"{self.name}: no training cases listed in {self.dataset_json}")
        ids = [c.case_id for c in cases]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise InputError(f"{self.name}: {self.dataset_json} lists case(s) more than once: {dupes}")
        return cases, []

    def _num_val(self, n_cases: int) -> int:
        return self.num_val if self.num_val is not None else max(1, round(n_cases / 5))

    def make_split(self, case_ids: list[str]) -> Split:
        num_val = self._num_val(len(case_ids))
        path = self.split_file or default_split_path(self.root, self.name, self.split_scheme, self.seed, self.num_folds, num_val)
        return load_or_create_split(
            case_ids, dataset=self.name, scheme=self.split_scheme, fold=self.fold, num_folds=self.num_folds,
            num_val=num_val, seed=self.seed, path=path, write=False,
        )

    def describe(self) -> dict:
        facts = super().describe()
        facts["msd_task"] = self.task_name
        facts["modalities"] = list(self.modalities)
        return facts

    def train_transforms(self) -> Compose:
        if self.uses_plan:
            return self.planned_transforms(train=True)
        return ct_train_transforms(self.patch_size, self.spacing, self.intensity_window, self.num_samples)

    def eval_transforms(self) -> Compose:
        if self.uses_plan:
            return self.planned_transforms(train=False)
        return ct_eval_transforms(self.spacing, self.intensity_window)

    def external_eval_transforms(self) -> Compose:
        return self.eval_transforms()  # it reads files already
