"""Training recipes: everything about how a net is trained that is not the net, selected by one name.

A recipe is part of every result (Isensee et al., "nnU-Net Revisited: A Call for Rigorous Validation in 3D
Medical Image Segmentation", MICCAI 2024): the same name goes into ``metrics.json``, every summary row and
every plot title. Two recipes are defined, and applied identically to every model:

- ``paper``: the SegResMamba paper's protocol (Das et al., MIDL 2025, App. A.1), which is MONAI's BraTS /
  BTCV tutorial recipe: the dataset's own MONAI augmentation chain (flips, small intensity shifts), Dice
  loss, Adam lr 1e-4 with coupled weight decay 1e-5, cosine schedule, one pass over the training cases
  per epoch.
- ``nnunet``: nnU-Net v2's default trainer (Isensee et al., "nnU-Net: a self-configuring method for deep
  learning-based biomedical image segmentation", Nature Methods 18:203-211, 2021; ``nnUNetTrainer`` of
  nnU-Net v2): spatial (rotation, scaling, mirroring) and intensity (noise, blur, brightness, contrast,
  low resolution, gamma) augmentation built from MONAI transforms, 33 % foreground oversampling, Dice +
  cross-entropy, SGD with Nesterov momentum 0.99, lr 1e-2, weight decay 3e-5, polynomial decay
  (exponent 0.9), 250 iterations per epoch, deep supervision for nets that have it; at test and predict
  time the logits are averaged over the 8 mirrorings of the spatial axes, as nnU-Net predicts. Where it
  differs from nnU-Net v2, :mod:`segresmamba.recipes.augment` says what and why.

:mod:`segresmamba.recipes.optim` builds the loss, optimiser and schedule of a recipe;
:mod:`segresmamba.recipes.augment` builds its augmentation chains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["Recipe", "RECIPES", "get_recipe", "list_recipes"]


@dataclass(frozen=True)
class Recipe:
    """One named training recipe.

    Attributes:
        name: the recipe's name, as in ``configs/recipe/<name>.yaml`` and in every result row.
        augmentation: which augmentation chain the data module builds (``paper``: the dataset's own MONAI
            chain; ``nnunet``: :func:`segresmamba.recipes.augment.nnunet_augmentations`).
        loss: ``dice`` (soft Dice) or ``dicece`` (Dice + cross-entropy, summed with weight 1 each).
        optimizer: ``adam`` (coupled L2 weight decay, as the paper's "weighted Adam") or ``sgd``.
        lr, weight_decay: initial learning rate and weight decay.
        momentum, nesterov: SGD momentum settings (unused by Adam).
        scheduler: ``cosine`` (to zero over the run), ``poly`` (``lr * (1 - t / T) ** poly_exponent``) or
            ``none``.
        poly_exponent: exponent of the polynomial schedule.
        iterations_per_epoch: training steps per epoch, drawn with replacement from the training cases;
            ``None`` makes an epoch one pass over the training cases.
        foreground_oversampling: fraction of training patches forced to be centred on foreground; the
            rest are centred anywhere in the volume (``None``: the dataset's own sampling).
        deep_supervision: train the lower-resolution heads of nets that have them.
        grad_clip_norm: clip the gradient norm to this value (``None``: no clipping).
        test_time_mirroring: at test and predict time (not the validation that monitors training), average
            the logits over every mirroring of the spatial axes (8 in 3D), as nnU-Net's predictor does
            (``use_mirroring``); costs 8 forward passes per window.
    """

    name: str
    augmentation: Literal["paper", "nnunet"]
    loss: Literal["dice", "dicece"]
    optimizer: Literal["adam", "sgd"]
    lr: float
    weight_decay: float
    scheduler: Literal["cosine", "poly", "none"]
    momentum: float = 0.0
    nesterov: bool = False
    poly_exponent: float = 0.9
    iterations_per_epoch: int | None = None
    foreground_oversampling: float | None = None
    deep_supervision: bool = False
    grad_clip_norm: float | None = None
    test_time_mirroring: bool = False

    def as_dict(self) -> dict:
        """The recipe's settings, as recorded beside every result."""
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper", augmentation="paper", loss="dice", optimizer="adam", lr=1e-4, weight_decay=1e-5,
        scheduler="cosine",
    ),
    "nnunet": Recipe(
        name="nnunet", augmentation="nnunet", loss="dicece", optimizer="sgd", lr=1e-2, weight_decay=3e-5,
        scheduler="poly", momentum=0.99, nesterov=True, poly_exponent=0.9, iterations_per_epoch=250,
        foreground_oversampling=0.33, deep_supervision=True, grad_clip_norm=12.0, test_time_mirroring=True,
    ),
}


def list_recipes() -> list[str]:
    """Names of the defined recipes."""
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; ValueError naming the known recipes otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    return RECIPES[name]
