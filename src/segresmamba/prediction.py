"""Predicted masks as files: one NIfTI per case, on the scan's own grid, named by case id.

Like ``nnUNetv2_predict`` (Isensee et al., Nature Methods 18:203-211, 2021), ``segresmamba predict`` writes
label maps with the input's shape, affine and orientation: the task maps its probabilities back onto the
scan's grid (MONAI ``Invertd``, see :class:`segresmamba.task.SegmentationTask`), :func:`export_mask` turns
them into a label map, and :class:`NiftiMaskWriter` saves each one as ``<output_dir>/<case_id>.nii.gz``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from monai.data import MetaTensor
from monai.transforms import SaveImage

from segresmamba.errors import InputError

__all__ = ["BRATS_REGIONS", "NiftiMaskWriter", "brats_label_map", "export_mask"]

BRATS_REGIONS = ("TC", "WT", "ET")
"""Region channels of the BraTS data modules (``ConvertToMultiChannelBasedOnBratsClassesd``): tumour
core {1, 4}, whole tumour {1, 2, 4}, enhancing tumour {4}."""


def brats_label_map(regions: torch.Tensor) -> torch.Tensor:
    """[TC, WT, ET] 0/1 channels (3, ...) -> BraTS labels (1, ...) uint8: 0 background, 2 peritumoral edema,
    1 necrotic tumour core, 4 enhancing tumour.

    The regions are painted from the outermost in: WT as 2, then TC as 1, then ET as 4 (nnU-Net's
    ``regions_class_order`` for BraTS), so a voxel takes the label of the innermost region that holds it.
    """
    if regions.shape[0] != len(BRATS_REGIONS):
        raise ValueError(f"BraTS regions need 3 channels [TC, WT, ET], got shape {tuple(regions.shape)}")
    tc, wt, et = (regions[i] > 0 for i in range(3))
    label = torch.zeros(regions.shape[1:], dtype=torch.uint8, device=regions.device)
    label[wt] = 2
    label[tc] = 1
    label[et] = 4
    return label[None]


def export_mask(
    probabilities: torch.Tensor, task: Literal["multilabel", "multiclass"], class_names: Sequence[str]
) -> torch.Tensor:
    """One case's class probabilities (C, ...) -> the mask written to disk, uint8, keeping the metadata
    (affine) of a MetaTensor input.

    ``multiclass``: the argmax class index per voxel (1, ...), background 0, as the dataset's labels are
    stored. ``multilabel`` with the BraTS regions [TC, WT, ET]: back to the BraTS labels 0/1/2/4
    (:func:`brats_label_map`). Any other ``multilabel`` task: one 0/1 channel per region (C, ...), written
    as a 4D NIfTI, since overlapping regions have no single label map.
    """
    data = probabilities.as_tensor() if isinstance(probabilities, MetaTensor) else probabilities
    if task == "multiclass":
        mask = data.argmax(0, keepdim=True).to(torch.uint8)
    elif task == "multilabel":
        regions = (data > 0.5).to(torch.uint8)
        mask = brats_label_map(regions) if tuple(class_names) == BRATS_REGIONS else regions
    else:
        raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
    return MetaTensor(mask, meta=probabilities.meta) if isinstance(probabilities, MetaTensor) else mask


class NiftiMaskWriter(BasePredictionWriter):
    """Writes each predicted case as ``<output_dir>/<case_id>.nii.gz`` (uint8, the scan's affine).

    Takes the ``{"case_id": [...], "mask": [...]}`` that :meth:`SegmentationTask.predict_step` returns per
    batch. The folder is created and tried with a test write when prediction starts, so a folder that cannot
    be written fails before the first case is predicted. Masks of in-memory data (no affine) get the
    identity affine.

    Args:
        output_dir: folder for the masks; ``None``: ``predictions/`` in the run folder (the trainer's log dir).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.folder: Path | None = None
        self.written: list[Path] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
                pass
        except OSError as err:
            raise InputError(f"output_dir {folder} cannot be written ({err.strerror or err}); choose another --output_dir") from None
        self.folder = folder
        self.written = []
        self._saver = SaveImage(
            output_ext=".nii.gz", output_dtype=np.uint8, resample=False, separate_folder=False, print_log=False,
        )

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Sequence[int] | None,
        batch: Any, batch_idx: int, dataloader_idx: int,
    ) -> None:
        if self.folder is None:
            raise ValueError("NiftiMaskWriter was not set up for prediction (its setup runs at the start of predict)")
        for case_id, mask in zip(prediction["case_id"], prediction["mask"]):
            if os.sep in case_id or case_id in ("", ".", ".."):
                raise InputError(f"case id {case_id!r} cannot name a file")
            path = self.folder / case_id
            self._saver(mask, filename=str(path))
            self.written.append(path.with_name(f"{case_id}.nii.gz"))
