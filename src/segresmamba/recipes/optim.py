"""The loss, optimiser and learning-rate schedule of a recipe.

The same builders serve the Lightning task and the efficiency profiler, so the step the profiler times is
the step the suite trains.
"""

from __future__ import annotations

import inspect

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from segresmamba.recipes import Recipe
from segresmamba.ssm.weight_decay import param_groups

__all__ = ["build_loss", "build_optimizer", "build_scheduler", "poly_factor"]


def build_loss(recipe: Recipe, task: str) -> nn.Module:
    """Soft Dice (``dice``) or Dice + cross-entropy (``dicece``) for a ``multilabel`` (sigmoid per region)
    or ``multiclass`` (softmax over classes, label as class indices) task.

    Squared denominators and ``smooth_dr=1e-5`` as in the paper's MONAI recipe. For ``dicece`` on a
    multilabel task the cross-entropy term is MONAI's binary cross-entropy per region channel.
    """
    if task not in ("multilabel", "multiclass"):
        raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
    kind = {"dice": DiceLoss, "dicece": DiceCELoss}.get(recipe.loss)
    if kind is None:
        raise ValueError(f"recipe {recipe.name!r}: loss must be 'dice' or 'dicece', got {recipe.loss!r}")
    activation = {"sigmoid": True} if task == "multilabel" else {"to_onehot_y": True, "softmax": True}
    return kind(**activation, smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True)


def _fused(kind: type[torch.optim.Optimizer], groups: list[dict], clipped: bool) -> dict:
    """``{"fused": True}`` where every parameter is a floating-point CUDA tensor, the gradients are not clipped
    and this torch's ``kind`` has a fused implementation, else ``{}`` (torch's default, the for-each kernels).

    The fused kernels compute the same update in one launch per parameter bucket, so the step costs the host
    a few launches instead of one or more per parameter tensor: on a GPU the eager training step is bound by
    the host's launches. A fused optimiser unscales 16-bit gradients itself, so Lightning's mixed-precision
    plugin refuses to clip them first; a clipped step keeps the for-each kernels. CPU runs keep the default,
    so their results do not move."""
    params = [p for group in groups for p in group["params"]]
    if clipped or not params or not all(p.is_cuda and p.is_floating_point() for p in params):
        return {}
    return {"fused": True} if "fused" in inspect.signature(kind).parameters else {}


def build_optimizer(recipe: Recipe, module: nn.Module, clipped: bool = False) -> torch.optim.Optimizer:
    """Adam with coupled L2 weight decay (the paper's "weighted Adam") or SGD with (Nesterov) momentum.

    Parameters marked ``_no_weight_decay`` (the selective scan's A_log and D, by Mamba's convention) are
    trained without weight decay (:func:`segresmamba.ssm.weight_decay.param_groups`). With the module on a
    GPU the optimiser runs its fused CUDA kernels (same update, see :func:`_fused`) unless the gradients are
    clipped: by the recipe (``grad_clip_norm``) or, with ``clipped``, by the caller (a trainer's
    ``gradient_clip_val``)."""
    if recipe.lr <= 0 or recipe.weight_decay < 0:
        raise ValueError(f"recipe {recipe.name!r}: lr must be > 0 and weight_decay >= 0, got {recipe.lr} and {recipe.weight_decay}")
    groups = param_groups(module, recipe.weight_decay)
    clips = clipped or recipe.grad_clip_norm is not None
    if recipe.optimizer == "adam":
        return torch.optim.Adam(groups, lr=recipe.lr, **_fused(torch.optim.Adam, groups, clips))
    if recipe.optimizer == "sgd":
        if not 0.0 <= recipe.momentum < 1.0:
            raise ValueError(f"recipe {recipe.name!r}: momentum must lie in [0, 1), got {recipe.momentum}")
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               **_fused(torch.optim.SGD, groups, clips))
    raise ValueError(f"recipe {recipe.name!r}: optimizer must be 'adam' or 'sgd', got {recipe.optimizer!r}")


def poly_factor(step: int, total: int, exponent: float) -> float:
    """nnU-Net's polynomial decay: ``(1 - step / total) ** exponent``, 0 from ``total`` on."""
    return max(0.0, 1.0 - step / total) ** exponent


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The recipe's schedule over ``total`` scheduler steps (epochs or optimiser steps; the caller decides
    the interval), or ``None`` for a constant learning rate."""
    if recipe.scheduler == "none":
        return None
    if total < 1:
        raise ValueError(f"a {recipe.scheduler} schedule needs at least one step, got {total}")
    if recipe.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if recipe.scheduler == "poly":
        if recipe.poly_exponent <= 0:
            raise ValueError(f"recipe {recipe.name!r}: poly_exponent must be > 0, got {recipe.poly_exponent}")
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: poly_factor(t, total, recipe.poly_exponent))
    raise ValueError(f"recipe {recipe.name!r}: scheduler must be 'cosine', 'poly' or 'none', got {recipe.scheduler!r}")
