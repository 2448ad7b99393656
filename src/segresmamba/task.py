"""The one LightningModule every model trains and is scored through."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import compute_dice

from segresmamba.registry import create_model, normalize_img_size


class SegmentationTask(L.LightningModule):
    """Patch training, whole-volume sliding-window evaluation, Dice per class and mean.

    The output activation follows the data's task: ``multilabel`` (overlapping regions such as BraTS
    TC/WT/ET) uses a sigmoid per channel, thresholded at 0.5; ``multiclass`` (BTCV organs, spleen) uses a
    softmax and argmax, and background is not scored. Dice per case comes from MONAI's ``compute_dice``; a
    class absent from a case's ground truth gives NaN for that case and is left out of that class's mean
    (``ignore_empty``). The mean Dice is the mean over classes of the per-class means.

    Models that return a list of outputs in training (deep supervision) are trained on every output:
    weights halve with each deeper output (nnU-Net's scheme, normalised to sum to one) and the label is
    resized to each output by nearest-neighbour interpolation.

    Args:
        net: registry name of the network (see ``segresmamba.list_models()``).
        net_kwargs: architecture settings passed to the network's factory.
        in_channels, out_channels, img_size: set from the data module by the CLI (patch size = ROI).
        task: ``multilabel`` or ``multiclass``; set from the data module.
        class_names: names of the scored classes, for the logged metric keys; set from the data module.
        loss: ``dice`` (the paper's) or ``dicece`` (Dice + cross-entropy, for multiclass tasks).
        lr, weight_decay: Adam (the paper's "weighted Adam": coupled L2 decay, lr 1e-4, decay 1e-5).
        scheduler: ``cosine`` (CosineAnnealingLR over the run, stepped per epoch, or per step when
            ``trainer.max_steps`` bounds the run) or ``none``.
        sw_overlap, sw_batch_size, sw_mode: MONAI sliding-window settings at evaluation.
    """

    def __init__(
        self,
        net: str = "segresmamba",
        net_kwargs: dict[str, Any] | None = None,
        in_channels: int = 4,
        out_channels: int = 3,
        img_size: int | Sequence[int] = 128,
        task: Literal["multilabel", "multiclass"] = "multilabel",
        class_names: list[str] | None = None,
        loss: Literal["dice", "dicece"] = "dice",
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        scheduler: Literal["cosine", "none"] = "cosine",
        sw_overlap: float = 0.5,
        sw_batch_size: int = 1,
        sw_mode: Literal["constant", "gaussian"] = "constant",
    ) -> None:
        super().__init__()
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
        if loss not in ("dice", "dicece"):
            raise ValueError(f"loss must be 'dice' or 'dicece', got {loss!r}")
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {scheduler!r}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr} and {weight_decay}")
        if not 0.0 <= sw_overlap < 1.0:
            raise ValueError(f"sw_overlap must be within [0, 1), got {sw_overlap}")
        self.save_hyperparameters()
        self.img_size = normalize_img_size(img_size)
        n_scored = out_channels if task == "multilabel" else out_channels - 1
        if task == "multiclass" and out_channels < 2:
            raise ValueError("a multiclass task needs out_channels >= 2 (background + classes)")
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(n_scored)]
        if len(self.class_names) != n_scored:
            raise ValueError(f"class_names lists {len(self.class_names)} names but the task scores {n_scored} classes")
        self.net = create_model(net, in_channels, out_channels, self.img_size, **(net_kwargs or {}))
        if task == "multilabel":
            self.loss_fn = (DiceLoss if loss == "dice" else DiceCELoss)(
                sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True
            )
        else:
            self.loss_fn = (DiceLoss if loss == "dice" else DiceCELoss)(
                to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- training ----------------------------------------------------------------------------------
    def _loss(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss_fn(outputs, label)
        weights = torch.tensor([0.5**i for i in range(len(outputs))])
        weights = weights / weights.sum()
        total = outputs[0].new_zeros(())
        for w, out in zip(weights.tolist(), outputs):
            target = label if out.shape[2:] == label.shape[2:] else F.interpolate(label.float(), size=out.shape[2:], mode="nearest")
            total = total + w * self.loss_fn(out, target)
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(self.net(batch["image"]), batch["label"])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; try precision 32-true "
                "or a lower lr"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    # -- evaluation --------------------------------------------------------------------------------
    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Whole-volume logits by sliding-window inference (ROI = training patch)."""
        return sliding_window_inference(
            image, roi_size=self.img_size, sw_batch_size=self.hparams.sw_batch_size, predictor=self.net,
            overlap=self.hparams.sw_overlap, mode=self.hparams.sw_mode,
        )

    def to_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> one-hot (multiclass, with background) or thresholded regions (multilabel)."""
        if self.hparams.task == "multilabel":
            return (torch.sigmoid(logits) > 0.5).float()
        return F.one_hot(logits.argmax(1), self.hparams.out_channels).movedim(-1, 1).float()

    def _score(self, batch: dict) -> torch.Tensor:
        """Per-case, per-scored-class Dice (B, n_classes), NaN where a class is absent from the label."""
        pred = self.to_mask(self.predict_logits(batch["image"]))
        label = batch["label"]
        if self.hparams.task == "multiclass":
            label = F.one_hot(label[:, 0].long(), self.hparams.out_channels).movedim(-1, 1).float()
            pred, label = pred[:, 1:], label[:, 1:]
        return compute_dice(pred, label, include_background=True, ignore_empty=True)

    def on_validation_epoch_start(self) -> None:
        self._eval_scores: list[torch.Tensor] = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_scores.append(self._score(batch).detach().cpu())

    test_step = validation_step

    def _log_eval(self, prefix: str) -> dict[str, float]:
        scores = torch.cat(self._eval_scores) if self._eval_scores else torch.empty(0, len(self.class_names))
        scores = self.all_gather(scores.to(self.device)).reshape(-1, len(self.class_names)).float().cpu()
        per_class = torch.nanmean(scores, dim=0)
        # class names become metric keys: keep them to one path component ("CSF/other" -> "CSF_other")
        results = {f"{prefix}/dice_{re.sub(r'[^0-9A-Za-z+-]+', '_', name)}": float(v) for name, v in zip(self.class_names, per_class)}
        results[f"{prefix}/dice_mean"] = float(torch.nanmean(per_class)) if len(per_class) else math.nan
        for key, value in results.items():
            self.log(key, value, prog_bar=key.endswith("mean"), sync_dist=False, rank_zero_only=False)
        return results

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        mask = self.to_mask(self.predict_logits(batch["image"]))
        if self.hparams.task == "multiclass":
            mask = mask.argmax(1, keepdim=True)
        return {"case_id": batch.get("case_id"), "mask": mask.to(torch.uint8).cpu()}

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "none":
            return optimizer
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            scheduler = {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=trainer.max_steps), "interval": "step"}
        else:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
            scheduler = {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs), "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
