"""Argument checks shared by the baseline factories: plain messages that name the setting at fault."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def check_divisible(model: str, img_size: Sequence[int], divisor: int | Sequence[int]) -> None:
    """Raise ``ValueError`` unless every side of ``img_size`` is divisible by the net's total stride.

    Args:
        model: the registry name, quoted in the message.
        img_size: (D, H, W) training patch.
        divisor: the total stride, one int for all axes or one per axis.
    """
    divisors = (divisor,) * len(img_size) if isinstance(divisor, int) else tuple(divisor)
    if any(s % d for s, d in zip(img_size, divisors)):
        fixed = tuple(max(d, round(s / d) * d) for s, d in zip(img_size, divisors))
        stride = divisors[0] if len(set(divisors)) == 1 else divisors
        raise ValueError(
            f"{model} needs every side of img_size divisible by {stride} (its total downsampling); "
            f"got img_size={tuple(img_size)}, use e.g. {fixed}"
        )


def check_fraction(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``0 <= value <= 1`` (dropout-like settings)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_positive(**settings: int) -> None:
    """Raise ``ValueError`` naming the first setting that is not a positive int."""
    for name, value in settings.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive_each(name: str, values: Sequence[int]) -> None:
    """Raise ``ValueError`` naming the first entry of ``values`` that is not a positive int."""
    check_positive(**{f"{name}[{i}]": v for i, v in enumerate(values)})


class DeepSupervisionList(nn.Module):
    """Wraps a net whose training-mode output is a tuple of deep-supervision logits, and returns them as
    the list the training step expects: [full resolution, coarser heads...]. Eval mode: one tensor."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        return out if isinstance(out, torch.Tensor) else list(out)
