"""Autocast's casts of a training step's parameters as one multi-tensor copy each way.

Under autocast each convolution and linear layer casts its fp32 weight and bias to the autocast dtype where it
runs, and the backward turns each of their low-precision gradients back into fp32: two small kernels per parameter
and step. In SegResMamba's graphed BraTS step they were about 240 launches and 0.9 ms of 30.4 ms of kernels (H200,
bf16; ``results/perf/step_profile_segresmamba_brats_fast_norms_channels_last.md``). :class:`ParameterCasts` finds
the parameters whose every use in the step is that cast, makes their casts in one ``torch._foreach_copy_`` before
the network runs, and runs the network on them (``torch.func.functional_call``); autocast leaves a tensor already
in its dtype as it is. The backward turns their gradients back into fp32 in one copy too. The values are
autocast's own: each parameter rounded the same way, and the same gradients. What is cast is decided from one traced
forward (:func:`castable_parameters`), so a parameter any other operator reads (a norm's weight, the fused ToM
layer's weights, a view of a weight) keeps autocast's own cast or none.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# modules whose forward reads its weight and bias once each, through the operator autocast casts for
CAST_BY_AUTOCAST = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class _ParameterReads(TorchDispatchMode):
    """Counts the operators that read each of ``params``: casts to ``dtype`` (as their tensor argument) and others."""

    def __init__(self, params: list[torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.index = {id(p): i for i, p in enumerate(params)}
        self.dtype = dtype
        self.casts = [0] * len(params)
        self.others = [0] * len(params)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        cast = func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == self.dtype
        for position, value in enumerate(tree_leaves((args, kwargs))):
            i = self.index.get(id(value))
            if i is not None:
                if cast and position == 0:
                    self.casts[i] += 1
                else:
                    self.others[i] += 1
        return func(*args, **kwargs)


def castable_parameters(net: nn.Module, run, dtype: torch.dtype) -> list[str]:
    """Names of ``net``'s parameters that ``run()`` (one training forward of ``net``, under the training autocast)
    reads through one cast to ``dtype`` and nothing else, where the parameter requires a gradient and belongs to one
    module alone, of :data:`CAST_BY_AUTOCAST`, that ran once. A module run twice is left to autocast: its two casts'
    gradients are added in fp32 there, and one shared cast would add them in ``dtype``."""
    owners: dict[str, nn.Module] = {}
    counted = {}
    for module_name, module in net.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(prefix=module_name, recurse=False, remove_duplicate=False):
            counted[id(p)] = counted.get(id(p), 0) + 1
            owners[name] = module
    named = {name: p for name, p in net.named_parameters(remove_duplicate=False)}
    candidates = [name for name, p in named.items()
                  if p.requires_grad and counted[id(p)] == 1 and type(owners[name]) in CAST_BY_AUTOCAST]
    modules = {id(owners[name]): owners[name] for name in candidates}
    calls = dict.fromkeys(modules, 0)

    def count(module, args):
        calls[id(module)] += 1

    hooks = [module.register_forward_pre_hook(count) for module in modules.values()]
    reads = _ParameterReads([named[name] for name in candidates], dtype)
    try:
        with reads:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return [name for i, name in enumerate(candidates)
            if reads.others[i] == 0 and reads.casts[i] == 1 and calls[id(owners[name])] == 1]


class _CastAll(torch.autograd.Function):
    """``params`` cast to ``dtype`` in one multi-tensor copy; the gradients back to each parameter's dtype in one."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.save_for_backward(*params)
        casts = [torch.empty_like(p, dtype=dtype) for p in params]  # each parameter's layout (channels_last kept)
        torch._foreach_copy_(casts, list(params))
        return tuple(casts)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor) -> tuple:
        present = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        for i, p in enumerate(ctx.saved_tensors):
            if grads[i] is not None:
                out[i] = torch.empty_like(p)  # the parameter's strides: a dense tensor's layout is preserved
        if present:
            torch._foreach_copy_([out[i] for i in present], [grads[i] for i in present])
        return (None, *out)


class ParameterCasts:
    """The autocast casts of ``names`` (parameters of ``net``, :func:`castable_parameters`) made in one copy.

    ``forward(net, *args)`` runs ``net(*args)`` on the casts (the call must be under the autocast of ``dtype``);
    their gradients reach the parameters in fp32, as autocast's own casts hand them.
    """

    def __init__(self, net: nn.Module, names: list[str], dtype: torch.dtype) -> None:
        params = dict(net.named_parameters(remove_duplicate=False))
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"not parameters of the network: {', '.join(unknown)}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.names = list(names)
        self.params = [params[n] for n in names]
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.names)

    def forward(self, net: nn.Module, *args):
        if not self.names:
            return net(*args)
        casts = _CastAll.apply(self.dtype, *self.params)
        return torch.func.functional_call(net, dict(zip(self.names, casts)), args, strict=False)


__all__ = ["CAST_BY_AUTOCAST", "ParameterCasts", "castable_parameters"]
