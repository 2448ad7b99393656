"""Shared machinery of the adapters that read a dataset from disk: discovery, validation, splits."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from monai.transforms import Compose

from segresmamba.data.base import VolumeDataModule, without_labels
from segresmamba.data.phantoms import PHANTOM_MARKER
from segresmamba.data.plan import cases_key, fingerprint_cases, load_or_create_plan, plan_with_overrides, read_case_ras
from segresmamba.data.splits import Split, save_split
from segresmamba.data.transforms import planned_preprocessing, planned_train_transforms, whole_volume_eval_transforms
from segresmamba.data.validation import CaseFiles, validate_cases
from segresmamba.errors import InputError

__all__ = ["OnDiskDataModule", "phantom_marker"]


def phantom_marker(root: str | Path) -> dict | None:
    """The phantom writers' marker at ``root`` (``None`` when absent, i.e. real data)."""
    path = Path(root).expanduser() / PHANTOM_MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    return data if isinstance(data, dict) else {}


class OnDiskDataModule(VolumeDataModule):
    """A dataset read from NIfTI files under ``root``.

    Subclasses implement :meth:`discover` (every labelled case, unvalidated, plus an optional labelled
    test list) and :meth:`make_split`; this class validates the cases once (:meth:`validate`, also run
    by :meth:`setup`) and turns the split into MONAI item dicts
    ``{"image": path or [paths], "label": path, "case_id": str}``.

    Provenance is "synthetic" when ``root`` holds a ``PHANTOM.json`` marker (written by
    :mod:`segresmamba.data.write_phantoms`), else "real".

    Args:
        root: dataset directory.
        fold: validation fold (see the subclass for the split scheme).
        seed: seed of a computed split (sorted ids + ``numpy.random.default_rng(seed).permutation``).
        split_file: where the computed split is written and read back (default under ``root/splits``).
            An existing file is authoritative: it is read, not recomputed, and ``seed`` is then unused.
        check_voxels: also read every image and label file in full: the files decompress, the values are
            finite, labels hold the declared values and some foreground (see
            :mod:`segresmamba.data.validation` for the cost, paid once: what each file held is remembered
            in ``<dataset>_validation_cache.json`` beside the split file); header checks always run.
        skip_bad_cases: skip cases failing validation with a warning naming each, and list them (with why)
            in :attr:`skipped_cases` and the run's ``metrics.json`` (default: one InputError listing them all).
        kwargs: ``patch_size``, ``batch_size``, ``num_workers``, ``cache_rate``, ``test_dir``,
            ``predict_dir``, ``empty_labels``, ``recipe``, ``iterations_per_epoch``: see
            :class:`~segresmamba.data.base.VolumeDataModule`.

    The split file is written only once the cases have passed validation (or the bad ones were skipped),
    so a failed validation leaves nothing behind and a run after fixing or removing a case starts clean.

    Plan (recipes that use one): fingerprinted from the training cases of the fold, cached as
    ``<split file stem>_fold<k>_plan.json`` in the split file's folder (default ``root/splits``), keyed by
    the training cases and modalities (:mod:`segresmamba.data.plan`); ``spacing_override`` and
    ``window_override`` (the subclass's explicit ``spacing`` / ``intensity_window``) replace its values.
    """

    root: Path
    modalities: list[str]
    spacing_override: tuple[float, ...] | None = None
    window_override: tuple[float, float] | None = None
    label_dtype: torch.dtype = torch.int64  # of the chains' labels: class indices (float32 0/1 for regions)
    brats_channels: bool = False  # one file per channel, BraTS labels turned into regions
    num_samples: int = 1  # training patches per volume

    def __init__(
        self,
        root: str,
        fold: int = 0,
        seed: int = 0,
        split_file: str | None = None,
        check_voxels: bool = True,
        skip_bad_cases: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if fold < 0:
            raise InputError(f"fold must be >= 0, got {fold}")
        self.root = Path(root).expanduser()
        self.fold = fold
        self.seed = seed
        self.split_file = split_file
        self.check_voxels = check_voxels
        self.skip_bad_cases = skip_bad_cases
        self.provenance = "synthetic" if phantom_marker(self.root) is not None else "real"
        self._cases: dict[str, CaseFiles] | None = None
        self._split: Split | None = None

    # -- to implement ------------------------------------------------------------------------------
    def discover(self) -> tuple[list[CaseFiles], list[CaseFiles]]:
        """(labelled training cases, labelled test cases or []). Raise InputError on a missing or empty root."""
        raise NotImplementedError

    def make_split(self, case_ids: list[str]) -> Split:
        """The split of the discovered (not yet validated) training case ids for ``self.fold``; a computed
        split is not written yet (``load_or_create_split(..., write=False)``): :meth:`validate` writes it
        once the cases pass."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def validate(self) -> dict:
        """Discover and check every case (headers; voxels when ``check_voxels``), compute or read the split,
        write it once the cases pass, and return a summary. Raises InputError naming each bad file, before
        any long work."""
        self.skipped_cases = []
        train_cases, test_cases = self.discover()
        split = self.make_split(sorted(c.case_id for c in train_cases))
        used = set(split.train) | set(split.val)
        policy = self.empty_labels
        every = [replace(c, empty_label=policy or "error") for c in train_cases if c.case_id in used]
        every += [replace(c, empty_label=policy or "warn") for c in test_cases]
        good, reasons = validate_cases(
            every, dataset=self.name, root=self.root, check_voxels=self.check_voxels,
            skip_bad_cases=self.skip_bad_cases, cache_file=self.validation_cache,
        )
        self._cases = {c.case_id: c for c in good}
        test_ids = [c.case_id for c in test_cases]
        keep = lambda ids: [i for i in ids if i in self._cases]  # noqa: E731
        kept = Split(train=keep(split.train), val=keep(split.val), test=keep(test_ids), source=split.source)
        for part in ("train", "val"):
            if not getattr(kept, part):
                raise InputError(f"{self.name}: the {part} split of fold {self.fold} is empty after validation ({self.root})")
        save_split(split)
        self._split = kept
        self.skipped_cases += [{"case_id": case_id, "reason": why} for case_id, why in reasons.items()]
        return {
            **self.describe(),
            "root": str(self.root),
            "fold": self.fold,
            "split_source": split.source,
            "num_train": len(kept.train),
            "num_val": len(kept.val),
            "num_test": len(kept.test or kept.val),
            "test_is_val": not kept.test,
            "skipped_cases": sorted(s["case_id"] for s in self.skipped_cases),
        }

    def setup(self, stage: str | None = None) -> None:
        if self._split is None:
            self.validate()

    @property
    def split(self) -> Split:
        if self._split is None:
            self.validate()
        assert self._split is not None
        return self._split

    def case_ids(self, split: Literal["train", "val", "test"]) -> list[str]:
        """Case ids of one split; ``test`` is the validation split unless a labelled test list exists."""
        s = self.split
        ids = {"train": s.train, "val": s.val, "test": s.test or s.val}[split]
        return list(ids)

    def _item(self, case: CaseFiles) -> dict:
        image: str | list[str] = [str(p) for p in case.images] if len(case.images) > 1 else str(case.images[0])
        return {"image": image, "label": str(case.label), "case_id": case.case_id}

    def items(self, split: Literal["train", "val", "test"]) -> list[dict]:
        ids = self.case_ids(split)
        assert self._cases is not None
        return [self._item(self._cases[i]) for i in ids]

    def describe(self) -> dict:
        facts = super().describe()
        facts["fold"] = self.fold
        return facts

    def cache_folder(self) -> Path:
        """The split file's folder (default ``root/splits``), where the plan and the validation cache live."""
        return Path(self.split_file).expanduser().parent if self.split_file else self.root / "splits"

    @property
    def validation_cache(self) -> str:
        return str(self.cache_folder() / f"{self.name}_validation_cache.json")

    def plan_path(self) -> Path:
        """Where the fold's plan is cached: beside the split file."""
        source = Path(self.split.source)
        stem = source.stem if source.suffix == ".json" else self.name
        return self.cache_folder() / f"{stem}_fold{self.fold}_plan.json"

    def predict_transforms(self) -> Compose:
        """The evaluation chain (it reads the files) without the label."""
        return without_labels(self.eval_transforms())

    def make_plan(self) -> dict:
        ids = self.case_ids("train")  # validates the cases first
        assert self._cases is not None
        train = [self._cases[i] for i in ids]
        record = load_or_create_plan(
            self.plan_path(), cases_key(train, self.modalities),
            lambda: fingerprint_cases(lambda i: read_case_ras(train[i]), len(train)), self.modalities,
        )
        plan = plan_with_overrides(record["plan"], spacing=self.spacing_override, intensity_window=self.window_override)
        return {**plan, "key": record["key"], "file": record["path"]}

    def planned_transforms(self, train: bool) -> Compose:
        """The plan's preprocessing, then nnU-Net's augmentation (``train``) or nothing (evaluation)."""
        preprocessing = planned_preprocessing(
            self.plan["target_spacing"], self.plan["normalization"], brats_channels=self.brats_channels
        )
        if not train:
            return whole_volume_eval_transforms(preprocessing, self.label_dtype)
        fraction = self.recipe_settings.foreground_oversampling or 0.0
        return planned_train_transforms(preprocessing, self.patch_size, self.num_samples, fraction, self.label_dtype)

    @staticmethod
    def _warn_unlisted(dataset: str, source: str, unlisted: Sequence[str]) -> None:
        if unlisted:
            shown = ", ".join(list(unlisted)[:10]) + (" ..." if len(unlisted) > 10 else "")
            warnings.warn(f"{dataset}: {len(unlisted)} case(s) on disk are not in {source} and are not used: {shown}", stacklevel=3)
