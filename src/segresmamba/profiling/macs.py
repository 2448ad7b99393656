"""Multiply-accumulate counts with fvcore, including the selective scan.

Convention: one multiply-add is one MAC, fvcore's native unit (its ``FlopCountAnalysis`` totals are
MACs; papers often print them as "FLOPs"). fvcore has no handle for custom autograd functions, so the
selective scan would count zero. We register one: per token, channel and state the scan does
``exp(delta * A)``, ``delta * B * u``, one state update ``h = dA * h + dBu`` and the read-out ``h * C``,
about 9 FLOPs (Gu & Dao's estimate, state-spaces/mamba issue #110), i.e. **4.5 MACs per
(batch, token, channel, state)** per scan direction. Elementwise ops (activations, additions, the gate)
stay uncounted, as fvcore does for every model; they are listed beside each count. A count is refused
when an op that carries real arithmetic (a scan, a matmul or convolution, attention) went uncounted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SCAN_MACS_PER_ELEMENT = 4.5
SCAN_OPS = (
    "prim::PythonOp.SelectiveScanFn",  # ours (torch) and mamba_ssm's CUDA kernel share the name
    "prim::PythonOp.SelectiveScanTritonFn",
)
# uncounted ops that would make a MAC count meaningless
HEAVY_OPS = frozenset(
    f"aten::{op}"
    for op in ("matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "linear", "_convolution", "convolution",
               "conv1d", "conv2d", "conv3d", "conv_transpose3d", "scaled_dot_product_attention")
)


class UncountedOpError(RuntimeError):
    """An op with real arithmetic has no MAC handle."""


def _scan_macs(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    b, d, length = get_shape(inputs[0])  # u: (rows, channels, length); rows = branches x batch when fused
    n = get_shape(inputs[2])[-1]  # A: (channels, d_state), or (branches, channels, d_state) for the Triton scan
    return int(SCAN_MACS_PER_ELEMENT * b * d * length * n)


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])  # (..., Lq, E), (..., Lk, E)
    batch = 1
    for s in q[:-2]:
        batch *= s
    return batch * q[-2] * k[-2] * q[-1] * 2  # QK^T and attention @ V


@dataclass
class MacCount:
    """Result of :func:`count_macs`: total and per-operator MACs, and what went uncounted."""

    total: int
    by_operator: dict[str, int]
    uncounted: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def uncounted_text(self) -> str:
        return "; ".join(f"{op} x{n}" for op, n in sorted(self.uncounted.items())) or "none"


def count_macs(model: nn.Module, inputs: torch.Tensor, strict: bool = True) -> MacCount:
    """MACs of one forward pass of ``model(inputs)`` in eval mode.

    Args:
        model: any module; custom scans are counted by the handles above.
        inputs: a batch, e.g. ``torch.zeros(1, 4, 128, 128, 128)``.
        strict: raise :class:`UncountedOpError` if a heavy op (scan, matmul, conv, attention) has no
            handle; else only report it in ``uncounted``.
    """
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, inputs)
        for op in SCAN_OPS:
            analysis.set_op_handle(op, _scan_macs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad():
            total = int(analysis.total())
        by_operator = {k: int(v) for k, v in analysis.by_operator().items() if v}
        uncounted = dict(Counter(analysis.unsupported_ops()))
    finally:
        model.train(was_training)
    heavy = {op: n for op, n in uncounted.items() if op in HEAVY_OPS or op.startswith("prim::PythonOp")}
    if strict and heavy:
        raise UncountedOpError(f"ops with arithmetic went uncounted (add a handle): {heavy}")
    return MacCount(total=total, by_operator=by_operator, uncounted=uncounted)
