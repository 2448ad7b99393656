"""Segmentation metrics: Dice and the 95 % Hausdorff distance per case and class, and their NaN-aware means.

Conventions (those of the Medical Segmentation Decathlon and BraTS evaluations, Maier-Hein et al.,
"Metrics reloaded", Nature Methods 21:195-212, 2024, for the choice of Dice + HD95):

- Scores are computed per case and per *scored* class: every region of a ``multilabel`` task (sigmoid
  per channel, > 0.5), every foreground class of a ``multiclass`` task (softmax argmax; the background
  channel is not scored).
- A class absent from a case's ground truth has no defined Dice or HD95 for that case: both are NaN and
  left out of that class's mean (MONAI ``compute_dice(ignore_empty=True)``).
- HD95 is MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two directed 95th
  percentiles of the distances between the boundary voxels of prediction and ground truth, in mm (the
  voxel spacing is passed per axis, so anisotropic voxels are measured correctly). When the class is in
  the ground truth but the prediction is empty, there is no boundary to measure from and the distance is
  unbounded; it is then set to the diagonal of the scored volume in mm, the largest distance possible
  inside it (the BraTS evaluation's convention: 373.13 mm for its 240 x 240 x 155 1 mm grid). Every
  reported HD95 is therefore finite or NaN.
- A class's mean is the mean over the cases where it is defined; the overall mean is the mean over the
  classes with a defined mean.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance

__all__ = [
    "activate",
    "aggregate",
    "dice_per_class",
    "hd95_per_class",
    "label_to_onehot",
    "case_rows",
    "metric_key",
    "prediction_to_onehot",
    "summarise",
    "voxel_spacing",
]

Task = Literal["multilabel", "multiclass"]


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else x


def _check_task(task: str) -> None:
    if task not in ("multilabel", "multiclass"):
        raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")


def activate(logits: torch.Tensor, task: Task) -> torch.Tensor:
    """Logits (B, C, ...) -> probabilities: a sigmoid per channel (multilabel) or a softmax over channels
    (multiclass)."""
    _check_task(task)
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


def prediction_to_onehot(probabilities: torch.Tensor, task: Task) -> torch.Tensor:
    """Probabilities (B, C, ...) -> the scored classes as 0/1 channels (B, n_scored, ...), float.

    ``multilabel``: each channel > 0.5 (n_scored = C). ``multiclass``: argmax over the channels, one-hot,
    background channel dropped (n_scored = C - 1).
    """
    _check_task(task)
    probabilities = _plain(probabilities)
    if task == "multilabel":
        return (probabilities > 0.5).float()
    channels = probabilities.shape[1]
    return F.one_hot(probabilities.argmax(1), channels).movedim(-1, 1)[:, 1:].float()


def label_to_onehot(label: torch.Tensor, task: Task, channels: int) -> torch.Tensor:
    """A label batch -> the scored classes as 0/1 channels (B, n_scored, ...), float.

    ``multilabel``: the label already holds one 0/1 channel per region (B, channels, ...). ``multiclass``:
    class indices (B, 1, ...) in [0, channels), one-hot with the background channel dropped.
    """
    _check_task(task)
    label = _plain(label)
    if task == "multilabel":
        if label.shape[1] != channels:
            raise ValueError(f"a multilabel label needs {channels} region channels, got shape {tuple(label.shape)}")
        return (label > 0).float()
    if label.shape[1] != 1:
        raise ValueError(f"a multiclass label holds class indices in one channel, got shape {tuple(label.shape)}")
    index = label[:, 0].long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= channels):
        raise ValueError(f"label values must lie in [0, {channels - 1}], got [{int(index.min())}, {int(index.max())}]")
    return F.one_hot(index, channels).movedim(-1, 1)[:, 1:].float()


def dice_per_class(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Dice (B, n_scored) of 0/1 channels; NaN where a class is absent from that case's label."""
    prediction, label = _plain(prediction), _plain(label)
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    return compute_dice(prediction, label, include_background=True, ignore_empty=True)


def hd95_per_class(prediction: torch.Tensor, label: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """95 % Hausdorff distance in mm (B, n_scored) of 0/1 channels on voxels of ``spacing`` mm per spatial axis.

    NaN where the class is absent from the label; the volume's diagonal in mm where the label has it and
    the prediction is empty (see the module docstring).
    """
    prediction, label = _plain(prediction), _plain(label)
    if prediction.shape != label.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
    spatial = prediction.shape[2:]
    spacing = [float(s) for s in spacing]
    if len(spacing) != len(spatial) or min(spacing) <= 0:
        raise ValueError(f"spacing needs {len(spatial)} positive voxel sizes in mm, got {spacing}")
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(spatial, spacing)))
    out = torch.full(prediction.shape[:2], math.nan, dtype=torch.float32)
    for b in range(prediction.shape[0]):
        for c in range(prediction.shape[1]):
            truth, guess = label[b, c] > 0, prediction[b, c] > 0
            if not truth.any():
                continue
            if not guess.any():
                out[b, c] = diagonal
                continue
            hd = compute_hausdorff_distance(
                guess[None, None].float(), truth[None, None].float(), include_background=True,
                percentile=95, spacing=spacing,
            )
            out[b, c] = float(hd[0, 0])
    return out


def aggregate(scores: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-case scores (N, n_classes) -> (per-class means over the cases where each is defined, mean over
    the classes with a defined mean). NaN where nothing is defined."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (cases, classes), got shape {tuple(scores.shape)}")
    scores = scores.float()
    if scores.shape[0] == 0:
        return torch.full((scores.shape[1],), math.nan), math.nan
    per_class = torch.nanmean(scores, dim=0)
    return per_class, float(torch.nanmean(per_class)) if per_class.numel() else math.nan


def metric_key(prefix: str, metric: str, class_name: str) -> str:
    """``<prefix>/<metric>_<class>`` with the class name kept to one path component ("CSF/other" ->
    "CSF_other"), as metric loggers and file names need."""
    return f"{prefix}/{metric}_{re.sub(r'[^0-9A-Za-z+-]+', '_', class_name)}"


def summarise(prefix: str, class_names: Sequence[str], scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{metric: per-case scores (N, n_classes)}`` -> ``<prefix>/<metric>_<class>`` (NaN-aware mean over the
    cases) and ``<prefix>/<metric>_mean`` (mean over the classes) for every metric, via :func:`aggregate`."""
    results: dict[str, float] = {}
    for metric, values in scores.items():
        per_class, mean = aggregate(values)
        results.update({metric_key(prefix, metric, name): float(v) for name, v in zip(class_names, per_class)})
        results[f"{prefix}/{metric}_mean"] = mean
    return results


def case_rows(
    case_ids: Sequence[str], class_names: Sequence[str], dice: torch.Tensor, hd95: torch.Tensor,
    eval_space: str, spacings: Sequence[Sequence[float]],
) -> list[dict]:
    """One row per case and class, the layout of ``test_cases.csv``: case_id, class, dice, hd95_mm,
    eval_space, spacing_mm (``1.2x1.2x3``)."""
    return [
        {
            "case_id": case_id, "class": name, "dice": float(dice[k, c]), "hd95_mm": float(hd95[k, c]),
            "eval_space": eval_space, "spacing_mm": "x".join(f"{float(s):g}" for s in spacings[k]),
        }
        for k, case_id in enumerate(case_ids)
        for c, name in enumerate(class_names)
    ]


def voxel_spacing(volume: torch.Tensor) -> tuple[float, ...]:
    """Voxel size in mm per spatial axis of one channel-first volume (C, ...) from its affine; 1 mm per
    axis for a plain tensor, which carries none."""
    spatial = volume.ndim - 1
    if isinstance(volume, MetaTensor):
        return tuple(float(s) for s in volume.pixdim[:spatial])
    return (1.0,) * spatial
