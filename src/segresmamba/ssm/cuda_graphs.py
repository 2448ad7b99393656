"""CUDA graphs for the ToM layers of a training step (partial-network capture).

A ToM layer's forward and backward are about 140 kernel launches and some 500 PyTorch calls. On volumes of
16^3 or 8^3 tokens the GPU finishes each kernel in microseconds, so the layer's time is the host's: about
6 ms per forward + backward on an H200 host, whatever the layer's size. :func:`graph_tom_layers` records each
chosen layer's forward and backward once as CUDA graphs (``torch.cuda.make_graphed_callables``) and replays
them in training steps: one launch per graph instead of hundreds. Layers whose GPU work is larger than their
host work gain little and would pin their temporaries in the graph pool, hence ``max_tokens``.

Constraints (those of partial-network capture, checked where they can be):

- static shapes: the training patch and batch size must not change after the capture;
- the graphs replay only for the captured input (shape, dtype), in training mode with gradients on; any other
  call of a layer runs its ordinary forward: validation, sliding-window inference, a smaller last batch;
- the captured layers share one memory pool and must run in the order of the capture, forward then
  backward in reverse, as an encoder does; the parameters must be updated in place (every
  ``torch.optim`` optimizer does) and must not be replaced;
- the ``auto`` scan choices are made in the warm-up before the capture, by the GPU's time alone
  (:func:`segresmamba.ssm.scan.timing_kernels`), and then stay fixed.

:func:`release_tom_graphs` restores the ordinary forward and frees the graphs. :class:`ToMCudaGraphs` is the
Lightning callback that captures them before a fit's first training step.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from segresmamba.ssm.scan import timing_kernels
from segresmamba.ssm.tom import TriOrientedMamba

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 32**3  # the largest ToM input measured host-bound (SegResMamba, BraTS 128^3 patches)


def tom_input_shapes(model: nn.Module, example_input: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(name, input shape, input dtype) of every ToM layer of ``model``, in the order a forward runs them.

    The forward runs in ``eval()`` without gradients (no running statistics change), under the given autocast.
    """
    seen: list[tuple[str, torch.Size, torch.dtype]] = []
    hooks = [
        module.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, args[0].shape, args[0].dtype)))
        for name, module in model.named_modules()
        if isinstance(module, TriOrientedMamba)
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(example_input.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return seen


def _allocator_settings_api() -> tuple | None:
    """PyTorch's (getter, setter) of the caching allocator's settings, or None where this build has neither."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    setter = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
              or getattr(torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None))
    return (getter, setter) if setter is not None else None


@contextmanager
def expandable_segments() -> Iterator[None]:
    """The caching allocator's expandable segments (``PYTORCH_ALLOC_CONF=expandable_segments:True``) for what is
    allocated inside: a capture's private memory pool then grows as one mapped range instead of one segment per
    size class, whose free ends no later request fits. On an H200 (SegResMamba, BraTS 128^3, bf16, whole-step
    graphs) that pool held 3.19 GiB for 2.05 GiB of tensors alive at once, and 2.44 GiB with expandable segments.

    Left as it is where the user chose the allocator's segments (``expandable_segments`` or another backend in the
    settings), where this PyTorch has no runtime setter, or where the allocator refuses the setting (with a warning in
    the log); restored on exit (the pool keeps its segments)."""
    api = _allocator_settings_api()
    chosen = " ".join(os.environ.get(k, "") for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"))
    now = api[0]().replace(" ", "").lower() if api is not None and api[0] is not None else ""
    user_chose = "expandable_segments" in chosen or "backend" in chosen or "expandable_segments:true" in now
    setter = None if api is None or user_chose else api[1]
    if setter is not None:
        try:
            setter("expandable_segments:True")
        except RuntimeError as err:  # an allocator that cannot expand its segments: the capture runs in its default ones
            log.warning("the CUDA-graph capture keeps the allocator's default segments: %s", err)
            setter = None
    try:
        yield
    finally:
        if setter is not None:
            setter("expandable_segments:False")


@contextmanager
def capture_setting(model: nn.Module, autocast_dtype: torch.dtype | None) -> Iterator[None]:
    """The setting of a training-step capture (``make_graphed_callables``' warm-up and capture), shared by the
    ToM-layer graphs and the whole-step graphs (:mod:`segresmamba.step_graphs`): ``model`` in training mode
    (restored afterwards), the training autocast without its weight-cast cache, which cannot cross a graph
    boundary (the capture casts inside the graphs), ``auto`` timing kernels alone, since a replay costs no
    launches (:func:`segresmamba.ssm.scan.timing_kernels`), and the graphs' pool in expandable segments
    (:func:`expandable_segments`)."""
    was_training = model.training
    model.train()
    try:
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None, cache_enabled=False), \
                timing_kernels(), expandable_segments():
            yield
    finally:
        model.train(was_training)


def warm_up(func, args: tuple, steps: int, allow_unused: bool = False) -> None:
    """``steps`` eager forward + backward passes of ``func`` on ``args``, as ``make_graphed_callables``' warm-up
    runs them (gradients taken by ``torch.autograd.grad`` for the inputs and parameters that require them: no
    ``.grad`` is written), with nothing of them alive afterwards."""
    inputs = tuple(a for a in args if a.requires_grad)
    if isinstance(func, nn.Module):
        inputs += tuple(p for p in func.parameters() if p.requires_grad)
    for _ in range(steps):
        outputs = [o for o in torch.utils._pytree.tree_leaves(func(*args)) if isinstance(o, torch.Tensor) and o.requires_grad]
        if outputs:
            torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs], allow_unused=allow_unused)
        del outputs


def warm_up_apart(pairs, steps: int, allow_unused: bool = False) -> None:
    """:func:`warm_up` of each ``(func, args)`` pair on a side stream, between device synchronisations (as
    ``make_graphed_callables`` runs its own): the capture that follows starts from an idle device.

    The allocator's cache is handed back before and after: it gives a cached block only to the stream it was made
    on, so blocks the caller's stream left cached are dead weight beside the warm-up's, and the warm-up's, made on a
    stream used once, beside whatever runs next (before a step's capture, two eager passes once doubled its peak
    reserved memory, 3.0 -> 6.0 GiB for SegResMamba's BraTS net)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with torch.cuda.stream(torch.cuda.Stream()):
        for func, args in pairs:
            warm_up(func, args, steps, allow_unused)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@contextmanager
def garbage_collected_first() -> Iterator[None]:
    """Python's cyclic garbage collected now, and the collector paused until the block ends.

    An unreachable cycle can hold CUDA graphs and their memory pool: a dropped :class:`~segresmamba.step_graphs.
    TrainingGraph` and its task refer to each other. If the collector frees such a cycle while another capture is
    recording, destroying the graphs and giving back their memory are calls a capture does not allow, and CUDA
    invalidates the capture (``cudaErrorStreamCaptureInvalidated``, and the CUDA generator is left in capture state).
    ``torch.cuda.graph`` once collected before every capture; torch 2.11 to 2.13 do so only under
    ``torch.compiler.config.force_cudagraph_gc``, so whether a collection falls inside a capture depends on what the
    process ran before."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def make_graphs(callables, samples: tuple, warmup: int, allow_unused_input: bool = False):
    """``torch.cuda.make_graphed_callables(callables, samples)`` after a warm-up of ``warmup`` passes run here
    (:func:`warm_up`, on a side stream between synchronisations, as torch runs its own), with the garbage collected
    before the capture and none collected during it (:func:`garbage_collected_first`).

    torch's own warm-up keeps its last pass's outputs and gradients referenced through the forward's capture (torch
    2.11 to 2.13 end it with ``for v in [...]: del v``, which drops the loop variable only, and rebind those names
    before the backward's capture): for a whole training step those are a copy of every parameter gradient, alive at
    the end of the forward, where the capture's memory peaks. Here they are gone before the first capture starts,
    and torch's warm-up is asked for none."""
    pairs = zip(callables, samples) if isinstance(callables, tuple) else [(callables, samples)]
    warm_up_apart(pairs, warmup, allow_unused_input)
    with garbage_collected_first():
        return torch.cuda.make_graphed_callables(callables, samples, num_warmup_iters=0, allow_unused_input=allow_unused_input)


def graph_tom_layers(
    model: nn.Module,
    example_input: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    warmup: int = 3,
) -> list[str]:
    """Capture the training forward and backward of ``model``'s ToM layers as CUDA graphs, in place.

    Args:
        model: a network on a CUDA device holding :class:`~segresmamba.ssm.TriOrientedMamba` layers.
        example_input: one training batch of ``model``'s input (its shape is the one captured).
        autocast_dtype: the training autocast dtype (``torch.bfloat16`` for ``bf16-mixed``), or None for fp32.
        max_tokens: capture only layers whose input has at most this many tokens (None: all).
        warmup: eager forward + backward passes before the capture (:func:`make_graphs`).

    Returns:
        The names of the captured layers, in execution order (empty if none qualified).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("graph_tom_layers needs a CUDA device; CUDA graphs do not exist on a CPU")
    if example_input.device.type != "cuda":
        raise ValueError(f"example_input must be on a CUDA device, got {example_input.device}")
    params = list(model.parameters())
    if not params or any(p.device != example_input.device for p in params):
        raise ValueError(f"the model's parameters must all be on {example_input.device}, as the example input")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1, got {warmup}")
    modules = dict(model.named_modules())
    chosen = [
        (name, shape, dtype)
        for name, shape, dtype in tom_input_shapes(model, example_input, autocast_dtype)
        if max_tokens is None or shape[2:].numel() <= max_tokens
    ]
    if any("forward" in vars(modules[name]) for name, _, _ in chosen):
        raise ValueError("these ToM layers already replay CUDA graphs; call release_tom_graphs(model) first")
    if len({name for name, _, _ in chosen}) != len(chosen):
        raise ValueError("a ToM layer runs more than once per forward; CUDA graphs of shared layers are not supported")
    if not chosen:
        return []
    layers = tuple(modules[name] for name, _, _ in chosen)
    samples = tuple((torch.randn(shape, dtype=dtype, device=example_input.device, requires_grad=True),) for _, shape, dtype in chosen)
    with capture_setting(model, autocast_dtype):
        make_graphs(layers, samples, warmup)
    for layer, (_, shape, dtype) in zip(layers, chosen):
        _dispatch(layer, shape, dtype)
    names = [name for name, _, _ in chosen]
    log.info("CUDA graphs captured for %d ToM layers: %s", len(names), ", ".join(names))
    return names


def _dispatch(layer: TriOrientedMamba, shape: torch.Size, dtype: torch.dtype) -> None:
    """Replay the graphs only for calls that match the capture; run every other call eagerly."""
    graphed = layer.forward  # the instance attribute make_graphed_callables installed
    eager = type(layer).forward.__get__(layer)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if layer.training and torch.is_grad_enabled() and x.shape == shape and x.dtype == dtype and x.requires_grad:
            return graphed(x)
        return eager(x)

    layer.forward = forward


def graphed_tom_layers(model: nn.Module) -> list[str]:
    """Names of the ToM layers of ``model`` that replay CUDA graphs."""
    return [name for name, m in model.named_modules() if isinstance(m, TriOrientedMamba) and "forward" in vars(m)]


def release_tom_graphs(model: nn.Module) -> list[str]:
    """Give every graphed ToM layer of ``model`` its ordinary forward back (the graphs are freed with it)."""
    names = graphed_tom_layers(model)
    for name in names:
        layer = model.get_submodule(name)
        del layer.forward
    return names


class ToMCudaGraphs(L.Callback):
    """Replays the ToM layers' training forward and backward as CUDA graphs (:func:`graph_tom_layers`).

    The capture runs once, before the first training step, on that step's batch and under the trainer's
    autocast. Small ToM layers are bound by the host's kernel launches, not by the GPU; their graphs replay
    in one launch each. Validation, inference and any batch of another shape run the layers eagerly.

    Args:
        max_tokens: capture only ToM layers whose input has at most this many tokens (None: all).
    """

    AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

    def __init__(self, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        self.captured: list[str] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.strategy.root_device.type != "cuda":
            raise ValueError(f"ToMCudaGraphs needs a CUDA device; this fit runs on {trainer.strategy.root_device.type}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.captured is None:
            dtype = self.AUTOCAST.get(str(trainer.precision))
            self.captured = graph_tom_layers(pl_module.net, batch["image"], dtype, self.max_tokens)


__all__ = ["DEFAULT_MAX_TOKENS", "ToMCudaGraphs", "graph_tom_layers", "graphed_tom_layers", "make_graphs", "release_tom_graphs",
           "tom_input_shapes", "warm_up", "warm_up_apart"]
