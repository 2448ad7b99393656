"""GroupNorm whose reductions parallelise over the whole tensor (a drop-in for ``nn.GroupNorm``).

Why: PyTorch's CUDA GroupNorm forward (``RowwiseMomentsCUDAKernel``) launches one thread block per
(sample, group) row. With batch 1 and 8 groups a (1, 48, 64, 64, 64) feature map is 8 blocks of 1.5 M
elements each, so an H200 mostly idles: the 6 decoder norms of SegResMamba cost 2.85 ms of forward
kernel time per training step, and the backward (``ComputeInternalGradientsCUDAKernel``, one block per
(sample, channel)) is similarly under-parallel. Reductions written with ordinary torch ops
(``var_mean`` / ``sum`` over a (N, G, M) view) go through PyTorch's split reduction across many blocks
and are memory-bound instead. :class:`GroupNormFunction` computes GroupNorm that way.

What is equal: the same function as ``nn.GroupNorm`` (biased variance, ``eps`` inside the square root,
per-channel affine ``weight`` / ``bias``), statistics in fp32 whatever the input dtype (fp64 for fp64
input), the same parameters and ``state_dict`` keys, and the same dtype contract under autocast (below).
What differs: the summation order of the reductions, so results equal ``nn.GroupNorm``'s within float
rounding (on the unit tests' cases: outputs within ~1e-6 in fp32 and ~1e-14 in fp64), not bit for bit.

Autocast. ``group_norm`` is on CUDA's autocast fp32 list (``AT_FORALL_FP32`` in
``aten/src/ATen/autocast_mode.h``, registered for ``AutocastCUDA`` and ``AutocastXPU`` in
``autocast_mode.cpp``; MPS lists it explicitly): every eligible floating input (fp16 / bf16 / fp32 on
that device; never fp64) is cast to fp32, so a bf16 input gives an fp32 output, and the cast being
autograd-visible, ``nn.GroupNorm`` then saves a full fp32 copy of the input for backward. CPU autocast
does not list ``group_norm`` at all (it falls through): a bf16 input gives a bf16 output there. This
module reproduces both contracts without the fp32 copy: the Function takes the output dtype as an
argument (fp32 when the device's autocast is on and the input is fp16/bf16, the input's dtype
otherwise), keeps and saves ``x`` in its own dtype, and computes in fp32 internally with autocast
switched off (autocast's ``promote`` policy for ``addcmul`` would otherwise materialise an fp32 copy).
A custom ``autograd.Function`` is not seen by autocast, so nothing is cast on the way in.

On CUDA, with Triton, for fp32 / bf16 / fp16 input that is contiguous or 5-D channels-last (the layout the
suite's ``channels_last`` setting gives the 3D conv activations), the same algebra runs as Triton kernels
(:mod:`segresmamba.models.group_norm_kernels`): two passes over the tensor forward (the statistics by
Welford/Chan updates, then the affine map written in the output dtype) and two backward (the per-channel
sums, then dx), with no full-size fp32 temporaries. Elsewhere (CPU, fp64, other strides) the torch ops below
run: on a channels-last map their broadcast ``addcmul`` and reductions over strided dims cost several times
the kernels (SegMamba's BraTS step, results/perf/scan_notes.md).

Tracing (``torch.jit.trace``, which fvcore's MAC counting uses) goes through ``F.group_norm``: fvcore
counts ``aten::group_norm`` with its norm handle (5 per element with affine, 4 without), while a custom
Function appears as ``prim::PythonOp.GroupNormFunction``, which fvcore has no handle for (counted 0).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["GroupNorm", "GroupNormFunction", "InstanceNorm3d", "group_norm", "use_fast_group_norm", "use_fast_norms"]

# devices whose autocast puts group_norm on the fp32 list (CPU's autocast does not list it)
_AUTOCAST_FP32_DEVICES = ("cuda", "xpu", "mps")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16 / bf16 / fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


@functools.cache
def _kernels():
    """:mod:`segresmamba.models.group_norm_kernels`, or None where Triton does not import."""
    try:
        from segresmamba.models import group_norm_kernels
    except ImportError:
        return None
    return group_norm_kernels


def _use_kernels(x: torch.Tensor) -> bool:
    """The Triton path: CUDA (or Triton's interpreter), a contiguous or 5-D channels-last fp32 / bf16 / fp16 tensor,
    Triton present."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not on_device or x.dtype not in (torch.float32, *_LOW_PRECISION) or _kernels() is None:
        return False
    return x.is_contiguous() or _kernels().is_channels_last(x)


def _per_channel(t: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, G) per-group values -> (N, C) per-channel values (a small copy)."""
    n, g = t.shape
    return t.unsqueeze(-1).expand(n, g, channels // g).reshape(n, channels)


def _mul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a * b as one elementwise pass computed and stored in ``acc`` (a bf16 x bf16 product is exact in fp32)."""
    if torch.promote_types(a.dtype, b.dtype) == acc:
        return a * b
    # a dimensioned fp32 zero takes part in type promotion, so addcmul computes in fp32 with the
    # bf16 operands cast inside the kernel: no fp32 copy of a or b
    zero = torch.zeros((1,) * a.dim(), dtype=acc, device=a.device)
    return torch.addcmul(zero, a, b)


class GroupNormFunction(torch.autograd.Function):
    """Group normalisation of an (N, C, *spatial) tensor with torch ops that parallelise over the tensor.

    ``apply(x, num_groups, weight, bias, eps, out_dtype)``; ``weight`` / ``bias`` (C,) or None;
    ``out_dtype`` None means ``x.dtype``.

    Forward: ``var, mean = var_mean(x viewed (N, G, C/G, *spatial))`` over all but (N, G), in fp32 (one
    transient fp32 copy of x when x is fp16/bf16, freed at once), ``rstd = rsqrt(var + eps)``; then
    ``y = x * scale[n, c] + shift[n, c]`` as one fused ``addcmul`` written straight into the output dtype,
    with ``scale = rstd[n, g] * w[c]`` and ``shift = b[c] - mean[n, g] * scale``. Saved: x (its own dtype),
    mean and rstd (N, G) and the weight.

    Backward. Per group (n, g) with M = (C/G) * prod(spatial) elements, write r = rstd, mu = mean,
    xhat = (x - mu) r, gw = grad_y * w[c]. The GroupNorm gradient is
    ``dx = r * (gw - mean_M(gw) - xhat * mean_M(gw * xhat))``. With the per-(n, c) partial sums
    ``S1[n, c] = sum_s grad_y`` and ``S2[n, c] = sum_s grad_y * x`` (two memory-bound reductions) and the
    per-group sums ``A = sum_{c in g} w[c] S1[n, c]`` (= sum gw) and ``B = sum_{c in g} w[c] S2[n, c]``
    (= sum gw * x), we have ``sum gw * xhat = r (B - mu A)``, hence

        dx = r w[c] grad_y - r A / M - r^3 (x - mu) (B - mu A) / M
           = p[n, c] * grad_y + a[n, g] * x + b2[n, g],
        p = r w[c],   a = r^3 (mu A - B) / M,   b2 = -a mu - r A / M,

    (the coefficients PyTorch's own kernels use: c2, c3 in ``group_norm_kernel.cu``), applied as one more
    elementwise pass: ``t = addcmul(b2, x, a)`` (fp32) then ``dx = addcmul(t, grad_y, p)`` written in x's
    dtype (in place into t when x is fp32/fp64). Stock torch has no three-operand fused op, so this is two
    kernels; full-size fp32 temporaries: the product grad_y * x for S2 (freed after its sum) and t.
    Parameter gradients from the same sums: ``dw[c] = sum_n r (S2 - mu S1)``, ``db[c] = sum_n S1``.
    All accumulation in fp32 (fp64 for fp64 input); results in the dtypes of x / weight / bias.
    """

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, out_dtype):
        n, c = x.shape[:2]
        if x.dim() < 3:
            raise ValueError(f"GroupNormFunction expects (N, C, *spatial) input, got shape {tuple(x.shape)}")
        if c % num_groups:
            raise ValueError(f"num_channels {c} is not divisible by num_groups {num_groups}")
        acc = _acc_dtype(x.dtype)
        out_dtype = x.dtype if out_dtype is None else out_dtype
        y = torch.empty_like(x, dtype=out_dtype)
        kernels = _kernels() if _use_kernels(x) else None
        with _no_autocast(x.device):
            if kernels is not None:
                mean, rstd = kernels.group_stats(x, num_groups, eps)
                kernels.normalize(x, y, mean, rstd, weight, bias)
            else:
                xg = x.unflatten(1, (num_groups, c // num_groups))  # a view for contiguous and channels-last x
                dims = tuple(range(2, xg.dim()))
                var, mean = torch.var_mean(xg if x.dtype == acc else xg.to(acc), dim=dims, correction=0)
                rstd = torch.rsqrt(var + eps)  # (N, G)
                scale = _per_channel(rstd, c)
                if weight is not None:
                    scale = scale * weight.to(acc)
                shift = _per_channel(mean, c) * scale
                shift = bias.to(acc) - shift if bias is not None else -shift
                bshape = (n, c) + (1,) * (x.dim() - 2)
                torch.addcmul(shift.view(bshape), x, scale.view(bshape), out=y)  # computed in acc, stored in out_dtype
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.num_groups = num_groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, mean, rstd, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        dx = dw = db = None
        n, c = x.shape[:2]
        g = ctx.num_groups
        acc = _acc_dtype(x.dtype)
        m = x.numel() // (n * g)
        dims = tuple(range(2, x.dim()))
        bshape = (n, c) + (1,) * (x.dim() - 2)
        with _no_autocast(x.device):
            if _use_kernels(x):
                layout = torch.channels_last_3d if _kernels().is_channels_last(x) else torch.contiguous_format
                dx, dw_n, db_n = _kernels().backward(grad_y.contiguous(memory_format=layout), x, mean, rstd, weight, need_x)
                if need_w and weight is not None:
                    dw = dw_n.sum(0).to(weight.dtype)
                if need_b and ctx.bias_dtype is not None:
                    db = db_n.sum(0).to(ctx.bias_dtype)
                return dx, None, dw, db, None, None
            s1 = grad_y.sum(dim=dims, dtype=acc)  # (N, C)
            s2 = _mul_acc(grad_y, x, acc).sum(dim=dims) if (need_x or need_w) else None
            mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)
            if need_x:
                w = None if weight is None else weight.to(acc)
                gw1, gw2 = (s1, s2) if w is None else (s1 * w, s2 * w)
                sum_gw = gw1.view(n, g, c // g).sum(-1)  # A
                sum_gwx = gw2.view(n, g, c // g).sum(-1)  # B
                a = (mean * sum_gw - sum_gwx) * rstd.pow(3) / m
                b2 = -a * mean - rstd * sum_gw / m
                p = rstd_c if w is None else rstd_c * w
                t = torch.addcmul(_per_channel(b2, c).view(bshape), x, _per_channel(a, c).view(bshape))
                if x.dtype == acc:
                    dx = t.addcmul_(grad_y, p.view(bshape))
                else:
                    dx = torch.addcmul(t, grad_y, p.view(bshape), out=torch.empty_like(x))
                    del t
            if need_w and weight is not None:
                dw = ((s2 - mean_c * s1) * rstd_c).sum(0).to(weight.dtype)
            if need_b and ctx.bias_dtype is not None:
                db = s1.sum(0).to(ctx.bias_dtype)
        return dx, None, dw, db, None, None


def _autocast_output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.group_norm`` would return for ``x`` under the current autocast state."""
    dev = x.device.type
    if x.dtype in _LOW_PRECISION and dev in _AUTOCAST_FP32_DEVICES and torch.is_autocast_enabled(dev):
        return torch.float32
    return x.dtype


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Functional form: ``F.group_norm`` semantics (including the autocast output dtype), via the Function."""
    if x.dim() < 3 or torch.jit.is_tracing():
        return F.group_norm(x, num_groups, weight, bias, eps)
    return GroupNormFunction.apply(x, num_groups, weight, bias, eps, _autocast_output_dtype(x))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same constructor, parameters and state_dict) computed by :class:`GroupNormFunction`.

    Falls back to ``F.group_norm`` for inputs with fewer than 3 dims and under ``torch.jit.trace`` (so
    fvcore counts an ``aten::group_norm``).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


def use_fast_group_norm(module: nn.Module) -> int:
    """Switch every exact ``nn.GroupNorm`` in ``module``'s tree (the root included) to :class:`GroupNorm`.

    In place: each such module object becomes a :class:`GroupNorm` (its class is swapped), so it keeps its
    Parameter objects, hooks, training flag and identity (optimisers, state dicts and any other
    reference to it are unaffected; a module shared by several parents is switched once). Subclasses of
    ``nn.GroupNorm`` are left alone. Returns how many modules were switched.
    """
    count = 0
    for mod in module.modules():
        if type(mod) is nn.GroupNorm:
            mod.__class__ = GroupNorm
            count += 1
    return count


class InstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` without running statistics, computed by :class:`GroupNormFunction` (one group per
    channel: instance normalisation is group normalisation with G = C).

    PyTorch runs instance norm as a batch norm over (1, N*C, ...) whose kernels put one thread block per
    channel on a 128^3-patch feature map (``batch_norm_collect_statistics_kernel``,
    ``batch_norm_backward_kernel``); here the reductions spread over the whole tensor. The output keeps the
    input's dtype, as ``F.instance_norm`` does under autocast (it is on no autocast cast list). Modules with
    running statistics, unbatched (4-D) inputs and ``torch.jit.trace`` take ``nn.InstanceNorm3d``'s own path.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.track_running_stats or input.dim() != 5 or torch.jit.is_tracing():
            return super().forward(input)
        return GroupNormFunction.apply(input, input.shape[1], self.weight, self.bias, self.eps, input.dtype)


def use_fast_norms(module: nn.Module) -> int:
    """:func:`use_fast_group_norm`, and every exact ``nn.InstanceNorm3d`` without running statistics switched
    to :class:`InstanceNorm3d` the same way (in place, same parameters). Returns how many were switched."""
    count = use_fast_group_norm(module)
    for mod in module.modules():
        if type(mod) is nn.InstanceNorm3d and not mod.track_running_stats:
            mod.__class__ = InstanceNorm3d
            count += 1
    return count
