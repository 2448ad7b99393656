"""The training step the profilers time: the suite's own, built from the configured model.

:func:`build_task` makes the :class:`~segresmamba.task.SegmentationTask` a run of ``segresmamba fit`` makes:
the model's ``configs/model/<name>.yaml`` (its architecture settings), the dataset's channels, task and
classes from :mod:`segresmamba.data.spec`, and a named recipe (loss, optimiser, deep supervision).
:class:`TrainingStep` then runs what Lightning's automatic optimisation runs per batch:
``task.training_step`` (forward and the task's loss, deep supervision included), backward, the recipe's
gradient clipping and the optimiser's step (built by :func:`segresmamba.recipes.optim.build_optimizer`
from the task's resolved recipe, as ``task.configure_optimizers`` does), under the run's autocast.

Two ways to feed it, as nnU-Net's benchmarking trainers do (``nnUNetTrainerBenchmark_5epochs`` and its
``_noDataLoading`` twin): :func:`synthetic_batch` (one fixed batch already on the device: the step alone)
and :func:`loader_batches` (the data module's training loader with its augmentation: the step as a run
sees it).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from segresmamba.bench.project import model_config
from segresmamba.data.spec import DatasetSpec
from segresmamba.recipes.optim import build_optimizer
from segresmamba.registry import check_patch, normalize_img_size
from segresmamba.task import SegmentationTask

__all__ = ["build_task", "TrainingStep", "synthetic_batch", "loader_batches", "model_settings"]

Precision = Literal["fp32", "bf16"]


def model_settings(model: str, root: Path | None = None) -> dict[str, Any]:
    """The ``model:`` block of ``configs/model/<model>.yaml`` (``{"net": model}`` when there is none)."""
    path = model_config(model, root)
    if path is None:
        return {"net": model}
    block = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(block, dict) or block.get("net") != model:
        raise ValueError(f"{path}: expected a `model:` block with `net: {model}`")
    return block


def build_task(
    model: str, spec: DatasetSpec, *, patch: int | tuple[int, int, int] | None = None, recipe: str = "paper",
    root: Path | None = None, channels_last: bool = False, fast_norms: bool | str = False,
) -> SegmentationTask:
    """The task ``segresmamba fit -c configs/model/<model>.yaml -c configs/recipe/<recipe>.yaml`` trains on
    ``spec``'s data (patch: the spec's paper patch unless given). The patch is checked against the
    model's registry facts first."""
    size = check_patch(model, normalize_img_size(patch) if patch is not None else spec.patch)
    settings = model_settings(model, root)
    return SegmentationTask(
        **settings, in_channels=spec.in_channels, out_channels=spec.out_channels, img_size=size, task=spec.task,
        class_names=list(spec.class_names), recipe=recipe, channels_last=channels_last,
        fast_norms=fast_norms,
    )


def synthetic_batch(spec: DatasetSpec, patch: tuple[int, int, int], device: torch.device, batch_size: int = 1, seed: int = 0) -> dict:
    """One training batch of random tensors on ``device``, shaped as the dataset's loader shapes them."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, spec.in_channels, *patch, generator=gen)
    if spec.multilabel:
        label = (torch.rand(batch_size, spec.out_channels, *patch, generator=gen) > 0.5).float()
    else:
        label = torch.randint(0, spec.out_channels, (batch_size, 1, *patch), generator=gen).float()
    return {"image": image.to(device), "label": label.to(device)}


def loader_batches(datamodule, device: torch.device) -> Iterator[dict]:
    """Training batches of a data module, endlessly, moved to ``device`` (the copy counts, as in a run)."""
    if hasattr(datamodule, "setup"):
        datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    for batch in itertools.chain.from_iterable(itertools.repeat(loader)):
        yield {"image": batch["image"].to(device, non_blocking=True), "label": batch["label"].to(device, non_blocking=True)}


class TrainingStep:
    """One optimisation step of ``task`` per call, as Lightning's automatic optimisation runs it.

    Args:
        task: the task (moved to ``device`` and put in training mode here).
        precision: ``fp32`` or ``bf16`` (autocast to bfloat16 with fp32 weights, Lightning's ``bf16-mixed``).
        device: where the step runs.
    """

    def __init__(self, task: SegmentationTask, precision: Precision, device: torch.device) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.task = task.to(device).train()
        self.device = device
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.optimizer = build_optimizer(task.recipe_settings, task)
        self.clip_norm = task.recipe_settings.grad_clip_norm
        self.steps = 0

    def loss_and_backward(self, batch: dict) -> torch.Tensor:
        """The step's forward and loss (``SegmentationTask.training_step`` under the precision's autocast) and its
        backward, without the optimiser: the gradients are left in ``.grad``."""
        with warnings.catch_warnings(), torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            # the step logs its loss; with no trainer attached Lightning warns that the value goes nowhere
            warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
            loss = self.task.training_step(batch, self.steps)
        loss.backward()
        return loss

    def __call__(self, batch: dict) -> torch.Tensor:
        loss = self.loss_and_backward(batch)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return loss.detach()
