"""Whether this CPU's PyTorch computes bf16 3D-convolution weight gradients correctly, checked before a
``bf16-mixed`` fit trains there.

On some x86 CPUs PyTorch's oneDNN bf16 convolution is wrong for degenerate shapes (pytorch/pytorch#163347, and
#169688 for a strided forward). With torch 2.13.0 on an AMD EPYC host the weight gradient of a 3x3x3 conv3d
(padding 1) over a 2x2x2 map is off by more than the gradient itself from 24 channels up (relative errors 0.9 to
1e37, or NaN), while 1^3 and 3^3 maps, every fp32 case, and at 2^3 the forward, the input gradient and the
weight gradients of strided, 1x1x1 and transposed convs are right (to bf16 rounding). A SegResMamba fit on 48^3
patches in bf16 reaches such a map in its deepest stage: that conv's weights received gradients of about 1e34,
and Adam turned them into NaN on the third step. The check runs the failing shape class in bf16 and in fp32
(about a millisecond) and compares the two gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["PROBE_CHANNELS", "TOLERANCE", "bf16_conv3d_weight_grad_error", "bf16_fit_refusal"]

# channel counts of the probe: 32 failed and 16 did not on the host above; 96 is SegResMamba's second stage
PROBE_CHANNELS = (32, 96)
# bf16 rounding leaves the probe's relative error near 0.005; a wrong kernel is off by about 1 or far more
TOLERANCE = 0.05


def bf16_conv3d_weight_grad_error(conv: Callable[..., torch.Tensor] = F.conv3d, channels: tuple[int, ...] = PROBE_CHANNELS) -> float:
    """The largest error of the bf16 weight gradient of ``conv`` (a 3x3x3 kernel, padding 1, over a 1 x C x 2^3
    map, C in ``channels``) against the fp32 one, relative to the fp32 gradient's largest magnitude, on the CPU
    (NaN where the bf16 gradient is not finite)."""
    worst = 0.0
    with torch.enable_grad():
        for c in channels:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, c, 2, 2, 2, generator=gen)
            w = torch.randn(c, c, 3, 3, 3, generator=gen) * 0.05
            grad_out = torch.randn(1, c, 2, 2, 2, generator=gen)
            exact = w.clone().requires_grad_()
            conv(x, exact, None, 1, 1).backward(grad_out)
            low = w.bfloat16().requires_grad_()
            conv(x.bfloat16(), low, None, 1, 1).backward(grad_out.bfloat16())
            error = ((low.grad.float() - exact.grad).abs().max() / exact.grad.abs().max()).item()
            if math.isnan(error):  # the bf16 gradient is not finite
                return error
            worst = max(worst, error)
    return worst


def bf16_fit_refusal(precision: str, on_cpu: bool, probe: Callable[[], float] = bf16_conv3d_weight_grad_error) -> str | None:
    """Why a fit at ``precision`` must not train on this CPU (its bf16 conv3d weight gradients are wrong), or None
    where it may: any precision but bf16 on a CPU, or a CPU whose check passes."""
    if not on_cpu or not precision.startswith("bf16"):
        return None
    error = probe()
    if error <= TOLERANCE:
        return None
    how_wrong = "not finite" if math.isnan(error) else f"off by {error:.3g} of the gradient's size"
    return (f"trainer.precision {precision} on this CPU: PyTorch {torch.__version__} computes wrong bf16 conv3d weight "
            f"gradients here (a 3x3x3 conv over a 2x2x2 map: {how_wrong}; oneDNN, pytorch/pytorch#163347), and a "
            "network's deepest stage can reach such a map; train on the CPU with --trainer.precision 32-true")
