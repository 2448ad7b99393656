"""What every dataset hands to the task: the contract between data adapters and the LightningModule.

A data module exposes ``in_channels``, ``out_channels``, ``task`` (``"multilabel"`` for overlapping
regions read through sigmoids, e.g. BraTS TC/WT/ET; ``"multiclass"`` for mutually exclusive labels read
through a softmax, e.g. BTCV organs), ``class_names`` (one per scored class; background is not scored in
multiclass tasks), ``patch_size`` and ``provenance`` (``"synthetic"`` or ``"real"``). Batches are dicts:
``image`` (B, in_channels, D, H, W) float32 and ``label``: (B, out_channels, D, H, W) 0/1 for multilabel,
(B, 1, D, H, W) integer class indices for multiclass. Training batches are patches; validation and test
batches are whole volumes (batch size 1), scored by sliding-window inference in the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import Compose, MapTransform
from torch.utils.data import WeightedRandomSampler

from segresmamba.data.external import pair_test_dir, predict_dir_cases, read_predict_dir, read_test_dir
from segresmamba.data.validation import EmptyLabels, check_empty_labels
from segresmamba.errors import InputError
from segresmamba.recipes import get_recipe
from segresmamba.registry import normalize_img_size

Task = Literal["multilabel", "multiclass"]


class VolumeDataModule(L.LightningDataModule):
    """Base class: subclasses fill the item lists and the transforms; loading, caching and loaders live here.

    Args:
        patch_size: training crop (D, H, W); also the sliding-window ROI at evaluation. ``None`` takes the
            dataset's default (``default_patch_size``: the paper's patch for the paper's datasets).
        batch_size: training patches per step (validation and test use whole volumes one at a time).
        num_workers: DataLoader worker processes.
        cache_rate: fraction of cases whose deterministic transforms are cached in memory
            (MONAI ``CacheDataset``); 0 reads from disk every time.
        test_dir: labelled external scans (``imagesTs/`` + ``labelsTs/``, nnU-Net layout) that replace the
            test split, read through :meth:`external_eval_transforms` (see :mod:`segresmamba.data.external`).
        predict_dir: a folder of unlabelled NIfTI images that ``predict`` reads instead of the test split
            (e.g. the ``imagesTs/`` of a Decathlon task): ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...
            per channel (nnU-Net's naming) or one 3D/4D file per case; one mask per case, named by case,
            on the image's own grid. ``None``: ``predict`` writes masks of the labelled test split.
        empty_labels: what a label without foreground is: ``error``, ``warn`` (named in a warning, used)
            or ``allow``; ``None``: an error for the cases that train and validate, a warning for
            the cases that are only scored (a labelled test list, ``test_dir``).
        recipe: the training recipe (:func:`segresmamba.recipes.get_recipe`): ``paper`` builds the
            dataset's own MONAI chains; ``nnunet`` preprocesses by the dataset's plan (:attr:`plan`,
            :mod:`segresmamba.data.plan`) and augments as nnU-Net v2
            (:func:`segresmamba.recipes.augment.nnunet_augmentations`).
        iterations_per_epoch: training batches per epoch, drawn with replacement (uniformly over the
            training items); ``None`` takes the recipe's value, and a recipe without one makes an epoch one
            pass over the training items.
    """

    in_channels: int
    out_channels: int
    task: Task
    class_names: list[str]
    provenance: Literal["synthetic", "real"]
    name: str
    default_patch_size: int = 128

    def __init__(
        self,
        patch_size: int | Sequence[int] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        cache_rate: float = 0.0,
        test_dir: str | None = None,
        predict_dir: str | None = None,
        empty_labels: EmptyLabels | None = None,
        recipe: str = "paper",
        iterations_per_epoch: int | None = None,
    ) -> None:
        super().__init__()
        check_empty_labels(empty_labels)
        self.empty_labels = empty_labels
        self.recipe_settings = get_recipe(recipe)  # an unknown name fails here, before any data is read
        self.recipe = recipe
        if iterations_per_epoch is not None and iterations_per_epoch < 1:
            raise InputError(f"iterations_per_epoch must be >= 1 or null, got {iterations_per_epoch}")
        self.iterations_per_epoch = (
            iterations_per_epoch if iterations_per_epoch is not None else self.recipe_settings.iterations_per_epoch
        )
        self._plan: dict | None = None
        self.patch_size = normalize_img_size(patch_size if patch_size is not None else self.default_patch_size)
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= cache_rate <= 1.0:
            raise InputError(f"cache_rate must be within [0, 1], got {cache_rate}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_rate = cache_rate
        self.test_dir = test_dir
        if test_dir is not None:
            pair_test_dir(test_dir)  # the file layout is checked now; headers and labels when the test split is read
        self.predict_dir = predict_dir
        if predict_dir is not None:
            predict_dir_cases(predict_dir)  # the same for the images to predict
        self.skipped_cases: list[dict[str, str]] = []  # {"case_id", "reason"} of cases validation left out
        self._datasets: dict[str, Dataset] = {}

    # -- to implement ------------------------------------------------------------------------------
    def items(self, split: Literal["train", "val", "test"]) -> list[dict]:
        """MONAI-style item dicts (file paths or arrays) of one split."""
        raise NotImplementedError

    def train_transforms(self) -> Compose:
        raise NotImplementedError

    def eval_transforms(self) -> Compose:
        raise NotImplementedError

    def external_eval_transforms(self) -> Compose:
        """The chain that reads a ``test_dir`` scan from disk into what :meth:`eval_transforms` yields for the
        module's own cases (training grid spacing, the training intensity normalisation)."""
        raise InputError(f"{self.name}: test_dir and predict_dir are not supported by this dataset (it defines no external_eval_transforms)")

    def predict_transforms(self) -> Compose:
        """The chain that reads a ``predict_dir`` image from disk: :meth:`external_eval_transforms`, which
        goes without a label (every keyed transform skips keys an item lacks)."""
        return without_labels(self.external_eval_transforms())

    @property
    def validation_cache(self) -> str | None:
        """Where validation remembers what each file held (:class:`~segresmamba.data.validation.FileCache`);
        ``None``: nowhere (in-memory data has no files of its own)."""
        return None

    def external_test_items(self) -> list[dict]:
        """The validated cases of ``test_dir`` as items (label values checked for multiclass tasks)."""
        if self.test_dir is None:
            raise InputError(f"{self.name}: no test_dir is set")
        values = range(self.out_channels) if self.task == "multiclass" else None
        return read_test_dir(
            self.test_dir, dataset=self.name, channels=self.in_channels, label_values=values,
            empty_labels=self.empty_labels or "warn", cache_file=self.validation_cache,
        )

    def predict_items(self) -> list[dict]:
        """The validated images of ``predict_dir`` as items ``{"image", "case_id"}``."""
        if self.predict_dir is None:
            raise InputError(f"{self.name}: no predict_dir is set")
        return read_predict_dir(self.predict_dir, dataset=self.name, channels=self.in_channels, cache_file=self.validation_cache)

    def make_plan(self) -> dict:
        """The dataset's preprocessing plan (:mod:`segresmamba.data.plan`), explicit settings applied."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------------
    @property
    def uses_plan(self) -> bool:
        """Whether the recipe preprocesses by the dataset's plan (the ``paper`` recipe keeps the paper's
        preprocessing and never computes a plan)."""
        return self.recipe_settings.augmentation == "nnunet"

    @property
    def plan(self) -> dict:
        """The preprocessing plan in force, computed (or read from its cache) on first use."""
        if self._plan is None:
            self._plan = self.make_plan()
        return self._plan

    def validate(self) -> dict:
        """Check the data before long work starts and return a summary; raise InputError naming every bad
        file or setting. Adapters that read files override this with per-case checks
        (:mod:`segresmamba.data.validation`); the base only checks that every split has items."""
        counts = {}
        for split in ("train", "val", "test"):
            n = len(self.items(split))  # type: ignore[arg-type]
            if n == 0:
                raise InputError(f"{self.name}: the {split} split is empty")
            counts[f"num_{split}"] = n
        return {**self.describe(), **counts}

    def describe(self) -> dict:
        """Facts about the data that go beside every result."""
        return {
            "dataset": self.name,
            "provenance": self.provenance,
            "task": self.task,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "class_names": list(self.class_names),
            "patch_size": list(self.patch_size),
            "recipe": self.recipe,
            "iterations_per_epoch": self.iterations_per_epoch,
            **({"plan": self.plan} if self.uses_plan else {}),
            **({"test_dir": str(self.test_dir)} if self.test_dir is not None else {}),
        }

    def _dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            external = split == "test" and self.test_dir is not None
            if split == "predict":
                items = self.predict_items()
            else:
                items = self.external_test_items() if external else self.items(split)  # type: ignore[arg-type]
            if not items:
                raise InputError(f"{self.name}: the {split} split is empty")
            if split == "predict":
                transform = self.predict_transforms()
            elif external:
                transform = self.external_eval_transforms()
            else:
                transform = self.train_transforms() if split == "train" else self.eval_transforms()
            if self.cache_rate > 0:
                # one caching thread unless workers are asked for: MONAI's default (one per CPU) raced in
                # multi-file LoadImaged + EnsureChannelFirstd and yielded channel-less volumes now and then
                ds = CacheDataset(items, transform, cache_rate=self.cache_rate, num_workers=max(1, self.num_workers), progress=False)
            else:
                ds = Dataset(items, transform)
            self._datasets[split] = ds
        return self._datasets[split]

    def _loader(self, split: str, batch_size: int, shuffle: bool, sampler: WeightedRandomSampler | None = None) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=split == "train" and self._trains_on_cuda(),
            persistent_workers=self.num_workers > 0,
        )

    def _trains_on_cuda(self) -> bool:
        """Whether the attached trainer runs on a CUDA device. Its training batches are then pinned: a copy from
        pageable memory makes the host wait for the GPU's queued work first, one stall per step that keeps the host
        from preparing the next step while the GPU runs this one. Whole-volume evaluation batches stay pageable
        (one copy per volume costs nothing next to its sliding window; pinning them would hold large buffers)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        if self.iterations_per_epoch is None:
            return self._loader("train", self.batch_size, shuffle=True)
        # Uniform draws with replacement. A WeightedRandomSampler, not a RandomSampler: Lightning replaces a
        # RandomSampler by a DistributedSampler over the dataset under DDP (dropping the count), but wraps
        # other samplers, splitting their draws between ranks; hence the world size in the count, so that
        # every rank takes iterations_per_epoch steps.
        world = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        items = len(self._dataset("train"))
        sampler = WeightedRandomSampler(
            torch.ones(items, dtype=torch.double), num_samples=self.iterations_per_epoch * self.batch_size * world,
            replacement=True,
        )
        return self._loader("train", self.batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", 1, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", 1, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if self.predict_dir is not None else "test", 1, shuffle=False)


def without_labels(chain: Compose) -> Compose:
    """``chain`` for items without a label: every keyed transform in it skips the keys an item lacks
    (MONAI's ``allow_missing_keys``), so the label steps of an evaluation chain pass unlabelled images."""
    for transform in chain.flatten().transforms:
        if isinstance(transform, MapTransform):
            transform.allow_missing_keys = True
    return chain
