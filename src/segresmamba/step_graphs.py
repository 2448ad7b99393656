"""CUDA graphs of the whole training forward, loss and backward (whole-network capture): the fastest mode.

An eager training step of a 3D network issues a few thousand kernel launches. Where the GPU finishes many of
them in microseconds (SegResMamba's small ToM layers, the deep decoder levels), the step waits on the host's
Python and launch overhead rather than on the GPU. :class:`TrainingGraph` records one training forward, the
task's loss (deep supervision included) and the backward once, as two CUDA graphs, and replays them: two launches
per step instead of thousands. The optimiser step, gradient clipping, loss scaling and DDP's gradient all-reduce
stay eager, outside the graphs.

The capture follows ``torch.cuda.make_graphed_callables`` (one memory pool, the forward captured before the
backward, the parameters as the inputs of one autograd node), with two differences that matter to a whole step.
The forward graph is replayed before that node is built, so its host work over every parameter (a few hundred
microseconds) overlaps the forward's kernels instead of delaying the first one; and the image is copied into the
captured input in the captured layout, so a channels-last step needs no conversion of its own. Under autocast the
graphs cast the convolution and linear weights in one multi-tensor copy each way (:mod:`segresmamba.param_casts`)
instead of two kernels per parameter: the same values.

Constraints (those of CUDA graphs, checked where they can be):

- static shapes: the graphs replay only for the captured image and label (shape, dtype), in training mode with
  gradients on; any other call runs the eager step (a smaller last batch, for instance);
- the parameters must be updated in place (every ``torch.optim`` optimiser does) and never replaced; their
  gradients are read from the graph's own buffers, so every optimiser step must be followed by
  ``zero_grad(set_to_none=True)`` (Lightning's and ``torch.optim``'s default) and gradient accumulation over
  several batches is refused;
- nothing in the forward may synchronise with the host or branch on tensor values; the suite's networks and
  losses do not (the GPU tests capture every ToM-holding model and the nnU-Net-style net with deep supervision);
- the ``auto`` scan choices are measured in the warm-up before the capture, by the GPU's time alone (a replay
  has no launch cost; :func:`segresmamba.ssm.scan.timing_kernels`), and then stay fixed.

:class:`StepCudaGraphs` is the Lightning callback (``configs/callbacks/step_graphs.yaml``) that captures the
graphs on the first training batch of a fit, under the trainer's autocast.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from segresmamba.param_casts import ParameterCasts, castable_parameters
from segresmamba.ssm.cuda_graphs import ToMCudaGraphs, capture_setting, garbage_collected_first, graphed_tom_layers, warm_up_apart

log = logging.getLogger(__name__)

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _layout_of(p: torch.Tensor) -> torch.memory_format:
    """The memory format a parameter's gradient must have for autograd to hand the gradient over as it is (the
    gradient layout contract of ``AccumulateGrad``): channels_last_3d for a 5-D parameter stored so (and not also
    contiguous, as a 1x1x1 kernel is), contiguous otherwise."""
    cl = p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous()
    return torch.channels_last_3d if cl else torch.contiguous_format


@contextmanager
def gradients_in_parameter_layouts(module: nn.Module) -> Iterator[None]:
    """Inside, the gradient that autograd computes for each parameter of ``module`` comes out in that parameter's
    layout (tensor hooks; a copy only where the layouts differ).

    For a capture: the graphs return their static gradient buffers, and autograd can hand a buffer to ``.grad`` only
    if its layout is the parameter's; otherwise every replay clones it, outside the graphs' pool. A conv's weight
    gradient need not come out in its weight's layout (PyTorch's CPU conv3d returns it contiguous for a
    channels_last_3d weight), so with ``--model.channels_last`` those clones could add up to the conv weights' size
    each step; captured here, the copies run inside the graph, into its pool."""
    handles = []
    for p in module.parameters():
        if p.requires_grad:
            fmt = _layout_of(p)
            handles.append(p.register_hook(lambda g, fmt=fmt: g if g.is_contiguous(memory_format=fmt) else g.contiguous(memory_format=fmt)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _NetAndLoss(nn.Module):
    """The task's network and loss as one module: its parameters are the network's (and the loss's, if any). With
    ``casts`` the network runs on its parameters' autocast casts made in one copy (:mod:`segresmamba.param_casts`)."""

    def __init__(self, task) -> None:
        super().__init__()
        self.net = task.net
        self.loss_fn = task.loss_fn
        self.loss_of = task._loss  # deep-supervision weighting + the recipe's loss, as the eager step runs it
        self.casts: ParameterCasts | None = None

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = self.net(image) if self.casts is None else self.casts.forward(self.net, image)
        return self.loss_of(logits, label)


class _ReplayedStep(torch.autograd.Function):
    """The loss of a training step whose forward graph has just replayed, as an autograd node over the parameters:
    its backward replays the backward graph and hands autograd the gradients in the graph's buffers, so DDP's hooks
    and ``.grad`` accumulation see them as after an eager step."""

    @staticmethod
    def forward(ctx, graph: "TrainingGraph", *params: torch.Tensor) -> torch.Tensor:
        ctx.graph = graph
        return graph._loss.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple:
        graph = ctx.graph
        if grad_loss.data_ptr() != graph._grad_loss.data_ptr():
            graph._grad_loss.copy_(grad_loss)
        graph._backward.replay()
        # new tensors on the buffers (not the buffers themselves, which this graph keeps referring to): autograd then
        # hands each to .grad as it is instead of cloning it
        return (None, *(g.detach() if g is not None else None for g in graph._grads))


class TrainingGraph:
    """A task's training forward + loss + backward recorded as CUDA graphs for one batch signature.

    Calling it with a batch of the captured shapes copies the batch into the captured inputs, replays the forward
    graph and returns the loss, with a ``grad_fn`` whose backward replays the backward graph and hands the parameter
    gradients to autograd (so DDP's hooks and ``.grad`` accumulation see them as usual).

    Args:
        task: a :class:`~segresmamba.task.SegmentationTask` on a CUDA device.
        image, label: one training batch (its shapes and dtypes are the ones captured).
        autocast_dtype: the training autocast dtype (``torch.bfloat16`` for ``bf16-mixed``), or None for fp32.
        warmup: eager forward + backward passes before the capture (cuDNN autotuning, the scan's ``auto``
            measurement and Triton's compilation happen there, not in the graph).
    """

    def __init__(self, task, image: torch.Tensor, label: torch.Tensor, autocast_dtype: torch.dtype | None = None, warmup: int = 3) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("TrainingGraph needs a CUDA device; CUDA graphs do not exist on a CPU")
        if image.device.type != "cuda" or label.device != image.device:
            raise ValueError(f"image and label must be on one CUDA device, got {image.device} and {label.device}")
        if any(p.device != image.device for p in task.net.parameters()):
            raise ValueError(f"the network's parameters must all be on {image.device}, as the batch")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        if graphed_tom_layers(task.net):
            raise ValueError("the ToM layers already replay their own CUDA graphs (ToMCudaGraphs); use one of the two modes")
        module = _NetAndLoss(task)
        self._params = tuple(p for p in module.parameters() if p.requires_grad)
        if not self._params:
            raise ValueError("the network has no trainable parameters: there is no training step to capture")
        self.signature = self._signature(image, label)
        self.task = task
        # the captured inputs, in the layout SegmentationTask.training_step would hand the net: with channels_last a
        # replay's copy into the image converts the loader's NCDHW batch, and the first conv reads NDHWC as eagerly
        layout = torch.channels_last_3d if getattr(task.hparams, "channels_last", False) else torch.contiguous_format
        self._image = image.detach().clone(memory_format=layout)
        self._label = label.detach().clone()
        self._forward, self._backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with capture_setting(task.net, autocast_dtype), gradients_in_parameter_layouts(module):
            # each eager pass before the capture hands the allocator's cache back (warm_up_apart), so none is held
            # beside the next: this warm-up, the casts' traced forward and their warm-up
            warm_up_apart([(module, (self._image, self._label))], warmup, allow_unused=True)
            if autocast_dtype is not None:
                self._cast_in_one_copy(module, autocast_dtype)
            pool = torch.cuda.graph_pool_handle()
            with garbage_collected_first():
                with torch.cuda.graph(self._forward, pool=pool):
                    loss = module(self._image, self._label)
                self._grad_loss = torch.empty_like(loss)
                with torch.cuda.graph(self._backward, pool=pool):
                    # allow_unused: parameters the training forward never reads (UNETR's unused ViT parts) get no
                    # gradient, as in the eager step
                    self._grads = torch.autograd.grad(loss, self._params, self._grad_loss, allow_unused=True)
        self._loss = loss.detach()
        self.casts: ParameterCasts | None = module.casts  # the parameters cast in one copy, under autocast
        # the replays write into the graphs' own pool and never reuse a block cached in the default one: whatever the
        # capture left cached there is handed back, so the process holds the graphs' memory and the tensors in use
        torch.cuda.empty_cache()

    def _cast_in_one_copy(self, module: _NetAndLoss, dtype: torch.dtype) -> None:
        """``module.casts``: the parameters' autocast casts in one copy (:mod:`segresmamba.param_casts`), their path
        run once eagerly before the capture; where that fails, a warning, and None (autocast casts each parameter as
        in the eager step)."""
        try:
            # after the warm-up, which made the scan's auto choices: the traced forward takes the captured path
            module.casts = ParameterCasts(module.net, castable_parameters(module.net, lambda: module.net(self._image), dtype), dtype)
            warm_up_apart([(module, (self._image, self._label))], 1, allow_unused=True)
        except (RuntimeError, TypeError, ValueError) as err:
            module.casts = None
            warnings.warn(f"the parameters' autocast casts in one copy failed and are not used ({type(err).__name__}: {err}); "
                          "the graphs cast each parameter where it is read, as the eager step", stacklevel=3)

    @staticmethod
    def _signature(image: torch.Tensor, label: torch.Tensor) -> tuple:
        return (tuple(image.shape), image.dtype, image.device, tuple(label.shape), label.dtype)

    def matches(self, image: torch.Tensor, label: torch.Tensor) -> bool:
        """Whether this call can replay the graphs: the captured batch signature, training mode, gradients on."""
        return (self.task.net.training and torch.is_grad_enabled() and not image.requires_grad
                and self._signature(image, label) == self.signature)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        for captured, given in ((self._image, image), (self._label, label)):
            if captured.data_ptr() != given.data_ptr():
                captured.copy_(given)
        # the forward's kernels first, the autograd node after: its work over every parameter then overlaps them
        self._forward.replay()
        return _ReplayedStep.apply(self, *self._params)


class StepCudaGraphs(L.Callback):
    """Replays the whole training forward, loss and backward as CUDA graphs (:class:`TrainingGraph`).

    The capture runs once, before the first training step, on that step's batch and under the trainer's
    autocast, and sets ``pl_module.step_graph``; ``SegmentationTask.training_step`` replays it for every batch of
    the captured shapes and runs eagerly otherwise. Validation, testing and prediction are eager. The graphs are
    released at the end of the fit.

    Refused (before any work): no CUDA device, ``accumulate_grad_batches`` above 1 (the graphs' gradient buffers
    are reused each step), and the ToM-layer graphs (``ToMCudaGraphs``) in the same run.
    """

    def __init__(self) -> None:
        self.captured: list[int] | None = None  # the image batch shape captured

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.strategy.root_device.type != "cuda":
            raise ValueError(f"StepCudaGraphs needs a CUDA device; this fit runs on {trainer.strategy.root_device.type}")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"StepCudaGraphs cannot accumulate gradients over batches (accumulate_grad_batches={trainer.accumulate_grad_batches}); use 1")
        if any(isinstance(c, ToMCudaGraphs) for c in trainer.callbacks):
            raise ValueError("StepCudaGraphs and ToMCudaGraphs cannot run together: the step graphs already hold the ToM layers")
        if not hasattr(pl_module, "step_graph"):
            raise ValueError(f"StepCudaGraphs needs a SegmentationTask (a module with a step_graph slot), got {type(pl_module).__name__}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.step_graph is None:
            dtype = AUTOCAST.get(str(trainer.precision))
            pl_module.step_graph = TrainingGraph(pl_module, batch["image"], batch["label"], dtype)
            self.captured = list(batch["image"].shape)
            log.info("CUDA graphs captured for the training step of %s, batch %s", pl_module.hparams.get("net"), tuple(batch["image"].shape))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and getattr(pl_module, "step_graph", None) is not None:
            pl_module.step_graph = None  # frees the graphs and their memory pool


__all__ = ["StepCudaGraphs", "TrainingGraph", "gradients_in_parameter_layouts"]
