"""Optimizer parameter groups that keep the selective scan's A and D out of weight decay.

Mamba (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023; its reference
implementation ``mamba_ssm.modules.mamba_simple``) marks ``A_log`` and ``D`` with ``_no_weight_decay = True``
and trains them without weight decay. Both are per-channel constants of the recurrence, not weights of a
projection: ``A = -exp(A_log)`` sets the decay rate of every state (initialised to 1..d_state, so that the
states cover many time scales), and decaying ``A_log`` towards 0 pulls every rate towards 1; ``D`` is the
skip gain, initialised to 1, which decay pulls towards 0. The ToM layer marks them the same way
(:func:`exclude_from_weight_decay`), and :func:`param_groups` is what an optimiser reads the mark through:
``torch.optim`` itself ignores it. Every other parameter keeps the recipe's weight decay, as before.
"""

from __future__ import annotations

from typing import Any

from torch import nn

NO_WEIGHT_DECAY = "_no_weight_decay"  # Mamba's attribute name, read by mamba_ssm-style training code too


def exclude_from_weight_decay(*params: nn.Parameter) -> None:
    """Mark parameters to be trained without weight decay (Mamba's ``_no_weight_decay`` attribute)."""
    for param in params:
        setattr(param, NO_WEIGHT_DECAY, True)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``module``'s parameters as optimizer groups: the marked ones at weight decay 0, the rest at ``weight_decay``.

    Pass the result where ``module.parameters()`` went, e.g. ``torch.optim.Adam(param_groups(net, 1e-5), lr=1e-4)``.
    Every parameter appears exactly once (shared ones once), in ``named_parameters`` order; a group with no
    parameters is left out. Other optimizer settings (lr, momentum) come from the optimizer's defaults.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decayed, exempt = [], []
    for param in module.parameters():
        (exempt if getattr(param, NO_WEIGHT_DECAY, False) else decayed).append(param)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


__all__ = ["NO_WEIGHT_DECAY", "exclude_from_weight_decay", "param_groups"]
