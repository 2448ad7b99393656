"""The one LightningModule every model trains and is scored through."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, decollate_batch
from monai.inferers import sliding_window_inference
from monai.transforms import InvertibleTransform, Invertd

from segresmamba.cublas_env import drop_monai_cublas_config
from segresmamba.data.transforms import ORIGINAL_LABEL
from segresmamba.errors import InputError
from segresmamba.metrics import (
    activate,
    case_rows,
    dice_per_class,
    hd95_per_class,
    label_to_onehot,
    prediction_to_onehot,
    summarise,
    voxel_spacing,
)
from segresmamba.models.group_norm import use_fast_group_norm, use_fast_norms
from segresmamba.models.upsample import use_fast_upsample
from segresmamba.prediction import export_mask
from segresmamba.recipes import get_recipe
from segresmamba.recipes.optim import build_loss, build_optimizer, build_scheduler
from segresmamba.registry import create_model, model_info, normalize_img_size


def mirrored(net: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` with test-time mirroring: the mean of its logits over every mirroring of the spatial axes
    of a (B, C, *spatial) input (8 passes in 3D), each mapped back, as nnU-Net v2's predictor averages them
    (Isensee et al., Nature Methods 2021)."""

    def predictor(x: torch.Tensor) -> torch.Tensor:
        spatial = range(2, x.dim())
        flips = [dims for k in range(1, len(spatial) + 1) for dims in itertools.combinations(spatial, k)]
        total = net(x)
        for dims in flips:
            total = total + torch.flip(net(torch.flip(x, dims)), dims)
        return total / (len(flips) + 1)

    return predictor


class LossWatch:
    """Stops training on a non-finite loss without a host-device synchronisation in the middle of each step.

    ``loss.item()`` right after the forward makes the host wait for the whole forward before it can queue any
    backward kernel. Here each step's loss is copied to pinned host memory without blocking, behind an event,
    and read once that event has passed (usually during the next step); :meth:`check` with ``wait`` reads every
    pending one, and the task calls it before each checkpoint, at the end of each training epoch and of the
    fit, so no checkpoint and no validation sees the weights of a non-finite step. On a CPU the check is
    immediate.
    """

    SLOTS = 8  # steps whose loss may be in flight at once

    def __init__(self) -> None:
        self._values: torch.Tensor | None = None
        self._pending: collections.deque = collections.deque()
        self._next = 0

    @staticmethod
    def _fail(value: float, step: int):
        return FloatingPointError(
            f"non-finite training loss ({value}) at step {step}; try precision 32-true or a lower lr"
        )

    def watch(self, loss: torch.Tensor, step: int) -> None:
        """Queue the check of ``loss`` (the loss of optimiser step ``step``); raise for an earlier one that failed."""
        if loss.device.type != "cuda":
            value = float(loss.detach())
            if not math.isfinite(value):
                raise self._fail(value, step)
            return
        self.check(wait=len(self._pending) >= self.SLOTS)
        if self._values is None:
            self._values = torch.zeros(self.SLOTS, dtype=torch.float32, pin_memory=True)
        slot = self._next % self.SLOTS
        self._next += 1
        self._values[slot].copy_(loss.detach().float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, slot, step))

    def check(self, wait: bool = False) -> None:
        """Read the losses whose copies have arrived (all of them with ``wait``); raise for a non-finite one."""
        while self._pending and (wait or self._pending[0][0].query()):
            event, slot, step = self._pending.popleft()
            event.synchronize()
            value = float(self._values[slot])
            if not math.isfinite(value):
                self._pending.clear()
                raise self._fail(value, step)


class SegmentationTask(L.LightningModule):
    """Patch training, whole-volume sliding-window evaluation, Dice and HD95 per case and class.

    The output activation follows the data's task: ``multilabel`` (overlapping regions such as BraTS
    TC/WT/ET) uses a sigmoid per channel, thresholded at 0.5; ``multiclass`` (BTCV organs, spleen) uses a
    softmax and argmax, and background is not scored. Scores follow :mod:`segresmamba.metrics`: Dice (and,
    at test, the 95 % Hausdorff distance in mm) per case and class, NaN where a class is absent from a
    case's ground truth and left out of that class's mean; the mean is over classes of the per-class means.

    Evaluation space: the network always predicts on the preprocessed grid (sliding window over the whole
    volume). With ``eval_space="original"`` the class probabilities are then mapped back onto the scan's
    own grid by MONAI ``Invertd`` (undoing orientation, resampling and crops, bilinear; the inverse of a
    crop pads with probability 0, i.e. background), as nnU-Net exports its predictions, and scored against
    the label as stored on disk (the evaluation chain's ``original_label``, see
    :mod:`segresmamba.data.transforms`). ``"resampled"`` scores on the preprocessed grid against the
    resampled label (the MONAI tutorials' Dice). Data whose evaluation chain makes no spatial change (the
    in-memory synthetic and MNI152 sets, BraTS) are scored on their own grid either way. The per-case rows
    of the last validation or test epoch are kept in ``eval_cases["val"|"test"]`` (gathered over every
    process), which :class:`~segresmamba.callbacks.RunRecorder` writes to ``test_cases.csv``.

    A non-finite input image or prediction at evaluation or prediction raises an
    :class:`~segresmamba.errors.InputError` naming the case and its file: it never becomes a score or mask.

    Prediction (``predict_step``) always maps back to the scan's own grid and returns one mask per case
    (:func:`segresmamba.prediction.export_mask`), which :class:`~segresmamba.prediction.NiftiMaskWriter`
    writes as NIfTI.

    Training follows a named recipe (:mod:`segresmamba.recipes`: ``paper`` or ``nnunet``), which sets the
    loss, optimiser, schedule, gradient clipping and whether nets with deep-supervision heads train them.
    ``loss``, ``lr``, ``weight_decay`` and ``scheduler`` override single settings of the recipe; the
    resolved recipe is ``self.recipe_settings`` and goes into every run record.

    Models that return a list of outputs in training (deep supervision) are trained on every output:
    weights halve with each deeper output (nnU-Net's scheme, normalised to sum to one) and the label is
    resized to each output by nearest-neighbour interpolation.

    Args:
        net: registry name of the network (see ``segresmamba.list_models()``).
        net_kwargs: architecture settings passed to the network's factory. ``deep_supervision`` given here
            wins over the recipe's choice.
        in_channels, out_channels, img_size: set from the data module by the CLI (patch size = ROI).
        task: ``multilabel`` or ``multiclass``; set from the data module.
        class_names: names of the scored classes, for the logged metric keys; set from the data module.
        recipe: the training recipe's name; set from the data module by the CLI (the data module builds the
            recipe's augmentation, the task its loss and optimisation).
        loss: ``dice`` or ``dicece`` (Dice + cross-entropy); ``None`` takes the recipe's.
        lr, weight_decay: ``None`` takes the recipe's (paper: Adam 1e-4 / 1e-5; nnunet: SGD 1e-2 / 3e-5).
        scheduler: ``cosine``, ``poly`` or ``none``; ``None`` takes the recipe's. The schedule runs over
            ``trainer.max_steps`` optimiser steps when that bounds the run, else over the epochs.
        sw_overlap, sw_batch_size, sw_mode: MONAI sliding-window settings at evaluation.
        test_time_mirroring: average test and predict logits over every mirroring of the spatial axes
            (:func:`mirrored`); ``None`` takes the recipe's (``nnunet``: on, ``paper``: off). The validation
            that monitors training never mirrors.
        eval_space: where test scores are computed, ``original`` (the scan's own grid) or ``resampled``.
        val_eval_space: the same for validation during fit (default ``resampled``: cheaper, and the
            validation Dice only monitors training); validation computes Dice, not HD95.
        channels_last: keep the network's 3D convolution weights and the training input in the
            ``channels_last_3d`` (NDHWC) memory layout, which cuDNN's tensor-core kernels use natively; the
            same computation in another layout (a speed setting, see ``results/perf/model_step.md``).
        fast_norms: ``True``: run the network's GroupNorm and InstanceNorm layers (those without running
            statistics) through :mod:`segresmamba.models.group_norm`: the same function, with reductions spread
            over the whole tensor (PyTorch's kernels give one thread block to each channel or group, which leaves
            a GPU idle at batch 1); the same parameters and state dict (a speed setting). On a GPU each norm then
            costs the host six Triton launches: it pays with the step-graph callback, or eagerly where the step
            is bound by the GPU (the nnU-Net-style net), not for a host-bound eager step such as SegResMamba's
            (``results/perf/scan_notes.md``, run 7). ``"group"``: the GroupNorm layers only, for eager steps:
            PyTorch's GroupNorm is the slow one (one block per (sample, group), in fp32 under autocast), and a
            network has few of them, whereas its InstanceNorm runs as PyTorch's batch-norm kernels at a third of the
            host's cost of the Triton path.

    Speed: ``step_graph`` holds the CUDA graphs of the training step when the
    :class:`~segresmamba.step_graphs.StepCudaGraphs` callback captured them (``configs/callbacks/step_graphs.yaml``);
    a non-finite training loss is caught without a per-step host synchronisation (:class:`LossWatch`).
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
        recipe: str = "paper",
        loss: Literal["dice", "dicece"] | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        scheduler: Literal["cosine", "poly", "none"] | None = None,
        sw_overlap: float = 0.5,
        sw_batch_size: int = 1,
        sw_mode: Literal["constant", "gaussian"] = "constant",
        test_time_mirroring: bool | None = None,
        eval_space: Literal["original", "resampled"] = "original",
        val_eval_space: Literal["original", "resampled"] = "resampled",
        channels_last: bool = False,
        fast_norms: bool | Literal["group"] = False,
    ) -> None:
        super().__init__()
        drop_monai_cublas_config()  # MONAI's import set it; it slows every cuBLAS call (segresmamba.cublas_env)
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
        if loss not in (None, "dice", "dicece"):
            raise ValueError(f"loss must be 'dice' or 'dicece', got {loss!r}")
        if scheduler not in (None, "cosine", "poly", "none"):
            raise ValueError(f"scheduler must be 'cosine', 'poly' or 'none', got {scheduler!r}")
        if fast_norms not in (False, True, "group"):
            raise ValueError(f"fast_norms must be true, false or 'group', got {fast_norms!r}")
        if (lr is not None and lr <= 0) or (weight_decay is not None and weight_decay < 0):
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {lr} and {weight_decay}")
        if not 0.0 <= sw_overlap < 1.0:
            raise ValueError(f"sw_overlap must be within [0, 1), got {sw_overlap}")
        for name, space in (("eval_space", eval_space), ("val_eval_space", val_eval_space)):
            if space not in ("original", "resampled"):
                raise ValueError(f"{name} must be 'original' or 'resampled', got {space!r}")
        self.eval_cases: dict[str, list[dict]] = {}
        self.save_hyperparameters()
        self.img_size = normalize_img_size(img_size)
        n_scored = out_channels if task == "multilabel" else out_channels - 1
        if task == "multiclass" and out_channels < 2:
            raise ValueError("a multiclass task needs out_channels >= 2 (background + classes)")
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(n_scored)]
        if len(self.class_names) != n_scored:
            raise ValueError(f"class_names lists {len(self.class_names)} names but the task scores {n_scored} classes")
        overrides = {"loss": loss, "lr": lr, "weight_decay": weight_decay, "scheduler": scheduler,
                     "test_time_mirroring": test_time_mirroring}
        self.recipe_settings = dataclasses.replace(get_recipe(recipe), **{k: v for k, v in overrides.items() if v is not None})
        net_kwargs = dict(net_kwargs or {})
        if self.recipe_settings.deep_supervision and model_info(net).deep_supervision:
            net_kwargs.setdefault("deep_supervision", True)
        self.net = create_model(net, in_channels, out_channels, self.img_size, **net_kwargs)
        # the same function as nn.Upsample's trilinear x2, by faster and deterministic kernels on CUDA
        use_fast_upsample(self.net)
        if fast_norms == "group":
            use_fast_group_norm(self.net)
        elif fast_norms:
            use_fast_norms(self.net)
        if channels_last:
            with torch.no_grad():  # the 5-D (3D conv) weights; every other tensor keeps its layout
                for param in self.net.parameters():
                    if param.dim() == 5:
                        param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
        self.loss_fn = build_loss(self.recipe_settings, task)
        self.step_graph = None  # a segresmamba.step_graphs.TrainingGraph while StepCudaGraphs runs
        self._loss_watch = LossWatch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # -- training ----------------------------------------------------------------------------------
    def _loss(self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            # the loss's softmax, one-hot products and sums over the voxels meet the NCDHW label there: on an NDHWC
            # output they run as strided, unvectorised kernels; one copy of the logits (and its gradient's) is cheaper
            outputs = outputs.contiguous() if isinstance(outputs, torch.Tensor) else [o.contiguous() for o in outputs]
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
        image, label = batch["image"], batch["label"]
        if self.step_graph is not None and self.step_graph.matches(image, label):
            loss = self.step_graph(image, label)  # copies the batch into its captured inputs, in their layout
        else:
            if self.hparams.channels_last:
                image = image.contiguous(memory_format=torch.channels_last_3d)
            loss = self._loss(self.net(image), label)
        # the optimiser step in a fit; the caller's step count where no trainer drives the task (the benchmarks)
        self._loss_watch.watch(loss, self.global_step if self._trainer is not None else batch_idx)
        # The progress bar turns each value it shows into a Python number, a host-device synchronisation on every
        # refresh: a per-step loss in the bar would make the host wait for each step's last kernel before queueing
        # the next step. So the bar shows the epoch mean (read once an epoch); the per-step loss goes to the logger,
        # which reads it every `log_every_n_steps`. The keys are those Lightning forks from one on_step+on_epoch log.
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=image.shape[0])
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=image.shape[0])
        return loss

    # a non-finite loss stops the fit before any checkpoint or validation sees its weights
    def on_train_epoch_end(self) -> None:
        self._loss_watch.check(wait=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._loss_watch.check(wait=True)

    def on_train_end(self) -> None:
        self._loss_watch.check(wait=True)

    # -- evaluation --------------------------------------------------------------------------------
    CASE_ID_BYTES = 256  # case ids travel between processes as fixed-width UTF-8 rows

    def predict_logits(self, image: torch.Tensor, mirror: bool = False) -> torch.Tensor:
        """Whole-volume logits by sliding-window inference on the preprocessed grid (ROI = training patch),
        each window's logits averaged over every mirroring of the spatial axes when ``mirror`` is set.

        The network sees plain tensors; a MetaTensor input keeps its metadata and transform record to itself.
        """
        data = image.as_tensor() if isinstance(image, MetaTensor) else image
        return sliding_window_inference(
            data, roi_size=self.img_size, sw_batch_size=self.hparams.sw_batch_size,
            predictor=mirrored(self.net) if mirror else self.net, overlap=self.hparams.sw_overlap, mode=self.hparams.sw_mode,
        )

    @staticmethod
    def to_original_grid(probabilities: torch.Tensor, image: torch.Tensor, transform: Any) -> torch.Tensor:
        """One case's class probabilities (C, ...) on the preprocessed grid -> on the scan's own grid.

        ``image`` is that case's evaluated image (C, ...) and ``transform`` the very chain that made it
        (MONAI ``Invertd`` checks the instance). The result is a MetaTensor carrying the scan's affine.
        A plain-tensor image (in-memory data) or a MetaTensor with no spatial transform applied is already
        on its own grid: the probabilities come back unchanged (with the image's metadata).
        """
        if not isinstance(image, MetaTensor):
            return probabilities
        if not image.applied_operations:
            return MetaTensor(probabilities, meta=image.meta)
        if not isinstance(transform, InvertibleTransform):
            raise ValueError(
                "the evaluated image was resampled, cropped or reoriented, but its data loader's dataset has no "
                "invertible MONAI transform to undo that with; set model.eval_space: resampled"
            )
        inverter = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)
        return inverter({"pred": MetaTensor(probabilities), "image": image})["pred"]

    @staticmethod
    def _loader_transform(loaders: Any, dataloader_idx: int) -> Any:
        """The transform of the dataset behind the current evaluation loader (what ``Invertd`` needs)."""
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        return getattr(getattr(loader, "dataset", None), "transform", None)

    @staticmethod
    def _case_ids(batch: dict) -> list[str]:
        ids = batch.get("case_id")
        if ids is None:
            raise ValueError("evaluation batches need a 'case_id' per case (every VolumeDataModule item has one)")
        return [ids] if isinstance(ids, str) else [str(i) for i in ids]

    @staticmethod
    def _source(image: torch.Tensor) -> str:
        """`` (<file>)``: the file an evaluated image was read from, or nothing for in-memory data."""
        name = image.meta.get("filename_or_obj") if isinstance(image, MetaTensor) else None
        if isinstance(name, (list, tuple)):
            name = ", ".join(str(n) for n in name)
        return f" ({name})" if isinstance(name, str) and name else ""

    def require_finite(self, batch: dict, ids: list[str], what: Literal["input image", "prediction"], values: torch.Tensor) -> None:
        """InputError naming the first case of ``ids`` whose ``values`` (B, ...) hold a NaN or Inf: a score
        or mask computed from them would be a number that means nothing (a NaN image scores Dice 0)."""
        finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(1)
        if bool(finite.all()):
            return
        n = int((~finite).nonzero()[0, 0])
        images = decollate_batch(batch["image"], detach=True)
        hint = (
            "; check the file, or validate the data first (the data modules' check_voxels)" if what == "input image"
            else "; the network's output is not finite (a diverged checkpoint, or too low a precision)"
        )
        raise InputError(f"case {ids[n]}: the {what} has non-finite values (NaN or Inf){self._source(images[n])}{hint}")

    def score_batch(
        self, batch: dict, space: Literal["original", "resampled"], transform: Any = None, with_hd95: bool = True,
        mirror: bool = False,
    ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores of one evaluation batch in ``space``: (case ids, Dice (B, n_classes), HD95 in mm
        (B, n_classes; NaN without ``with_hd95``), voxel size in mm of the scored grid (B, 3)).

        ``transform`` is the evaluation chain that made the batch, needed for ``space="original"`` when it
        changed the grid (see :meth:`to_original_grid`).
        """
        task = self.hparams.task
        ids = self._case_ids(batch)
        self.require_finite(batch, ids, "input image", batch["image"])
        probabilities = activate(self.predict_logits(batch["image"], mirror), task)
        self.require_finite(batch, ids, "prediction", probabilities)
        keys = [k for k in ("image", "label", ORIGINAL_LABEL) if k in batch]
        items = decollate_batch({k: batch[k] for k in keys}, detach=True)
        if len(items) != len(ids):
            raise ValueError(f"a batch of {len(items)} cases lists {len(ids)} case ids")
        dice, hd95, spacing = [], [], []
        for prob, item, case_id in zip(probabilities, items, ids):
            label = item["label"]
            if space == "original":
                changed = isinstance(item["image"], MetaTensor) and bool(item["image"].applied_operations)
                if changed and ORIGINAL_LABEL not in item:
                    raise ValueError(
                        f"case {case_id}: the evaluation chain changed the image grid but keeps no '{ORIGINAL_LABEL}' "
                        "(the label as stored) to score against in the original space; set model.eval_space: resampled"
                    )
                prob = self.to_original_grid(prob, item["image"], transform)
                label = item.get(ORIGINAL_LABEL, label)
            if prob.shape[1:] != label.shape[1:]:
                raise ValueError(
                    f"case {case_id}: prediction grid {tuple(prob.shape[1:])} differs from the {space}-space label grid "
                    f"{tuple(label.shape[1:])}"
                )
            pred = prediction_to_onehot(prob[None], task)
            truth = label_to_onehot(label[None], task, self.hparams.out_channels)
            voxel = voxel_spacing(label if isinstance(label, MetaTensor) else prob)
            dice.append(dice_per_class(pred, truth).float().cpu())
            hd95.append(hd95_per_class(pred, truth, voxel) if with_hd95 else torch.full_like(dice[-1], float("nan")))
            spacing.append(torch.tensor([voxel], dtype=torch.float32))
        return ids, torch.cat(dice), torch.cat(hd95), torch.cat(spacing)

    def on_validation_epoch_start(self) -> None:
        self._scored: list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]] = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        space = self.hparams.val_eval_space
        transform = self._loader_transform(self.trainer.val_dataloaders, dataloader_idx) if space == "original" else None
        self._scored.append(self.score_batch(batch, space, transform, with_hd95=False))

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        space = self.hparams.eval_space
        transform = self._loader_transform(self.trainer.test_dataloaders, dataloader_idx) if space == "original" else None
        self._scored.append(self.score_batch(batch, space, transform, with_hd95=True, mirror=self.recipe_settings.test_time_mirroring))

    def _encode_ids(self, ids: list[str]) -> torch.Tensor:
        rows = torch.zeros(len(ids), self.CASE_ID_BYTES, dtype=torch.uint8)
        for n, case_id in enumerate(ids):
            raw = case_id.encode()
            if len(raw) > self.CASE_ID_BYTES:
                raise ValueError(f"case id {case_id!r} is longer than {self.CASE_ID_BYTES} bytes")
            rows[n, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return rows

    def _gathered_cases(self) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every process's scored cases, each case once (a distributed sampler repeats cases to even out
        the processes' shares)."""
        n = len(self.class_names)
        ids = [i for part in self._scored for i in part[0]]
        tensors = [
            self._encode_ids(ids),
            torch.cat([p[1] for p in self._scored]) if self._scored else torch.empty(0, n),
            torch.cat([p[2] for p in self._scored]) if self._scored else torch.empty(0, n),
            torch.cat([p[3] for p in self._scored]) if self._scored else torch.empty(0, 3),
        ]
        encoded, dice, hd95, spacing = (
            self.all_gather(t.to(self.device)).reshape(-1, t.shape[1]).cpu() for t in tensors
        )
        names = [bytes(row.tolist()).rstrip(b"\0").decode() for row in encoded]
        first = {name: k for k, name in reversed(list(enumerate(names)))}
        keep = sorted(first.values(), key=lambda k: names[k])
        return [names[k] for k in keep], dice[keep].float(), hd95[keep].float(), spacing[keep]

    def _log_eval(self, prefix: str, space: str, with_hd95: bool) -> dict[str, float]:
        ids, dice, hd95, spacing = self._gathered_cases()
        results = summarise(prefix, self.class_names, {"dice": dice, **({"hd95": hd95} if with_hd95 else {})})
        for key, value in results.items():
            self.log(key, value, prog_bar=key.endswith("dice_mean"), sync_dist=False, rank_zero_only=False)
        self.eval_cases[prefix] = case_rows(ids, self.class_names, dice, hd95, space, spacing.tolist())
        return results

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.hparams.val_eval_space, with_hd95=False)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.hparams.eval_space, with_hd95=True)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """One mask per case on the scan's own grid (whatever ``eval_space``): ``{"case_id": [...],
        "mask": [uint8 MetaTensor per case]}`` with the scan's affine (see :func:`segresmamba.prediction.export_mask`)."""
        task = self.hparams.task
        ids = self._case_ids(batch)
        self.require_finite(batch, ids, "input image", batch["image"])
        probabilities = activate(self.predict_logits(batch["image"], self.recipe_settings.test_time_mirroring), task)
        self.require_finite(batch, ids, "prediction", probabilities)
        transform = self._loader_transform(self.trainer.predict_dataloaders, dataloader_idx)
        images = decollate_batch(batch["image"], detach=True)
        masks = [
            export_mask(self.to_original_grid(prob, image, transform), task, self.class_names).cpu()
            for prob, image in zip(probabilities, images)
        ]
        return {"case_id": ids, "mask": masks}

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        recipe = self.recipe_settings
        trainer = self.trainer
        optimizer = build_optimizer(recipe, self, clipped=bool(trainer.gradient_clip_val))
        if trainer.max_steps and trainer.max_steps > 0:
            total, interval = trainer.max_steps, "step"
        else:
            total, interval = (trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1), "epoch"
        scheduler = build_scheduler(recipe, optimizer, total)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # the recipe's clipping (nnU-Net clips the gradient norm at 12); a trainer setting still wins
        if gradient_clip_val is None and self.recipe_settings.grad_clip_norm is not None:
            gradient_clip_val, gradient_clip_algorithm = self.recipe_settings.grad_clip_norm, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
