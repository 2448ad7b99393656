"""Which ops of a training step read or write 5-D maps in mixed or strided memory layouts.

An elementwise op whose operands do not share one dense layout (all NCDHW, or all NDHWC under
``channels_last``) runs in PyTorch's unvectorised, index-computing kernel (``elementwise_kernel<...
gpu_kernel_impl_nocast...>`` in a profile), at a fraction of the vectorised kernel's bandwidth; a batched
``matmul`` over views whose batch axes cannot be merged copies its operands first (a ``clone`` of a strided
view). A kernel profile (:mod:`perf.step_profile`) shows such a kernel's time, not the op that launched it.
This audit runs one forward, loss and backward of the suite's training step (:mod:`segresmamba.bench.step`,
after one untimed step) under a dispatch mode and lists those ops: where they ran (the innermost modules in
the forward, the autograd node in the backward), the operands' layouts and shapes, how often, ranked by
the elements they touch:

    python -m perf.layout_audit --model segmamba --channels-last --fast-norms --out results/perf

writes ``layout_audit_<model>_<config>[_fast_norms][_channels_last].md``. On a CPU the step runs the CPU
paths (the PyTorch scan, PyTorch norms), so audit on the GPU the step whose profile is being explained.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import segresmamba
from perf.step_profile import NORMS_TEXT, add_step_arguments, write_step_report
from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
from segresmamba.data.spec import get_dataset_spec
from segresmamba.provenance import provenance

# ops that only make views or allocate: they move no data, so their operands' layouts cost nothing
_NO_DATA = frozenset({
    "detach", "view", "_unsafe_view", "reshape", "t", "permute", "alias", "as_strided", "expand", "slice", "select", "unsqueeze",
    "squeeze", "transpose", "unflatten", "flatten", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros_like", "ones_like", "full_like",
    "_reshape_alias", "set_", "resize_",
})
# convolutions pick their own kernels per layout (cuDNN converts where it must; the profile shows those as conversions)
_OWN_LAYOUT = frozenset({"convolution", "convolution_backward", "cudnn_convolution", "_convolution"})
DEFAULT_MIN_ELEMENTS = 4096


def layout_of(t: torch.Tensor) -> str:
    """``NCDHW`` or ``NDHWC`` for a dense 5-D tensor in that layout, ``broadcast`` for an expanded one (a stride
    of 0, e.g. the gradient of a sum), else ``strided <strides>``."""
    if 0 in t.stride():
        return "broadcast"
    if t.is_contiguous():
        return "NCDHW"
    if t.is_contiguous(memory_format=torch.channels_last_3d):
        return "NDHWC"
    return f"strided {tuple(t.stride())}"


@dataclass(frozen=True)
class Finding:
    """One kind of op on 5-D maps whose operands and results do not share one dense layout."""

    where: str  # "forward: <modules>" or "backward: <autograd node>"
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


class LayoutAudit(TorchDispatchMode):
    """Records, per :class:`Finding`, how often it ran and the elements of its largest 5-D tensor, summed."""

    def __init__(self, min_elements: int = DEFAULT_MIN_ELEMENTS):
        super().__init__()
        self.min_elements = min_elements
        self.calls: Counter[Finding] = Counter()
        self.elements: Counter[Finding] = Counter()
        self._modules: list[str] = []
        self._hooks: list = []

    def __enter__(self):
        self._hooks = [
            torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: self._modules.append(type(m).__name__)),
            torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: self._pop()),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _pop(self) -> None:
        if self._modules:
            self._modules.pop()

    def _maps(self, tensors) -> list[torch.Tensor]:
        return [t for t in tensors if isinstance(t, torch.Tensor) and t.dim() == 5 and t.numel() >= self.min_elements]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _NO_DATA or name in _OWN_LAYOUT:
            return out
        ins = self._maps(tree_leaves((args, kwargs)))  # a list operand too (``cat``'s tensors)
        outs = self._maps(tree_leaves(out))
        layouts = {layout_of(t) for t in ins + outs} - {"broadcast"}
        if not layouts or (len(layouts) == 1 and not next(iter(layouts)).startswith("strided")):
            return out
        node = torch._C._current_autograd_node()
        where = f"backward: {type(node).__name__}" if node is not None else f"forward: {'/'.join(self._modules[-2:]) or '(outside modules)'}"
        finding = Finding(where, name, tuple(map(layout_of, ins)), tuple(map(layout_of, outs)), tuple(tuple(t.shape) for t in ins[:3]))
        self.calls[finding] += 1
        self.elements[finding] += max(t.numel() for t in ins + outs)
        return out


def audit_step(task, batch: dict, precision: str = "bf16", min_elements: int = DEFAULT_MIN_ELEMENTS) -> LayoutAudit:
    """One untimed training step (caches, measured backend choices), then the audited one: the suite's step
    (:meth:`segresmamba.bench.step.TrainingStep.loss_and_backward`: the task's forward and loss under
    ``precision``, and the backward), without the optimiser. Gradients are left zeroed."""
    step = TrainingStep(task, precision, next(task.parameters()).device)
    audit = LayoutAudit(min_elements)
    for audited in (False, True):
        with audit if audited else contextlib.nullcontext():
            step.loss_and_backward(batch)
        task.zero_grad(set_to_none=True)
    return audit


def report(audit: LayoutAudit, title: str, facts: str, top: int = 40) -> list[str]:
    lines = [f"# {title}", "", facts, ""]
    if not audit.calls:
        return lines + ["No op on a 5-D map mixed layouts or read a strided one."]
    lines += [
        "| M elements | calls | where | op | operands | results | operand shapes |",
        "|---:|---:|---|---|---|---|---|",
    ]
    for finding, elements in audit.elements.most_common(top):
        lines.append(f"| {elements / 1e6:.1f} | {audit.calls[finding]} | `{finding.where}` | `{finding.op}` | "
                     f"{', '.join(finding.inputs) or '-'} | {', '.join(finding.outputs) or '-'} | "
                     f"{', '.join('x'.join(map(str, s)) for s in finding.shapes) or '-'} |")
    if len(audit.calls) > top:
        lines += ["", f"{len(audit.calls) - top} smaller kinds not shown."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(p)
    p.add_argument("--patch", type=int, default=None, help="cubic patch side (default: the config's paper patch)")
    p.add_argument("--min-elements", type=int, default=DEFAULT_MIN_ELEMENTS, help="ignore 5-D tensors smaller than this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.model not in segresmamba.list_models():
        raise SystemExit(f"error: unknown model {args.model!r}; known models: {', '.join(segresmamba.list_models())}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device} asked for, but CUDA is not available")
    if args.patch is not None and args.patch < 1:
        raise SystemExit(f"error: --patch must be a positive side; got {args.patch}")
    device = torch.device(args.device)
    spec = get_dataset_spec(args.config)
    patch = (args.patch,) * 3 if args.patch else tuple(spec.patch)
    task = build_task(args.model, spec, patch=patch, recipe=args.recipe, channels_last=args.channels_last,
                      fast_norms=args.fast_norms).to(device).train()
    audit = audit_step(task, synthetic_batch(spec, patch, device), args.precision, args.min_elements)
    prov = provenance(device, args.precision)
    layout = "NDHWC" if args.channels_last else "NCDHW"
    title = f"Mixed and strided layouts in a training step of {args.model}, {args.config} {'x'.join(map(str, patch))} b1 {args.precision}, {layout}"
    facts = (f"{prov['device']} · git {prov['git_sha']} · torch {torch.__version__} · synthetic tensors, the suite's training step "
             f"(recipe {args.recipe}: forward, loss, backward; one step after an untimed one), norms: "
             f"{NORMS_TEXT[args.fast_norms]}. "
             f"Each row is one kind of op on 5-D tensors of at least {args.min_elements} elements whose operands and results are "
             "not all dense in one layout (NCDHW or NDHWC): on a GPU such an elementwise op runs in PyTorch's unvectorised kernel "
             "(`gpu_kernel_impl_nocast`), and a `clone` of a strided view is a copy that a reshape could not avoid. "
             "M elements: the largest operand's elements, summed over the calls. `python -m perf.layout_audit`.")
    write_step_report(args, "layout_audit", report(audit, title, facts), echo_from=4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
