"""The fused ToM layer's host work, measured on any machine: its Triton launches replaced by counters.

On an H200 the eager SegResMamba step spends about 1.1 ms of host time per ToM layer in the forward alone, 8.7 of
the forward's 21.3 ms of hooked host time (``results/perf/step_profile_segresmamba_brats.md``, the forward's host
time by module class), and the layer's autograd node is the costliest operator of the backward. Apart from the
launches themselves, that work (Python, the dispatcher's calls, autograd's nodes) is the same on every device. Here the
layer's fused path (:class:`segresmamba.ssm.triton.fused_tom.TriOrientedMixFn`) runs on the CPU on a small
map, with every Triton kernel's launch replaced by a counter that runs nothing (:func:`launches_counted`). What
is timed is then the host's work around the launches, plus the small CPU operators' own compute; what is
counted (:func:`operator_counts`) is what the layer asks of the dispatcher and of Triton per forward and backward,
as on a GPU. The kernels do not run, so the outputs are garbage: this measures cost, never values.

    python -m perf.tom_host --out results/perf

writes ``tom_host.md``. Times move with the machine; compare them only within one run, on one machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from perf import publish

# operators that make no kernel: views and metadata (a launch-free dispatcher call each)
VIEW_OPS = frozenset({
    "alias", "as_strided", "chunk", "detach", "diagonal", "expand", "flatten", "narrow", "permute", "reshape",
    "_reshape_alias", "select", "slice", "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind",
    "unflatten", "unsqueeze", "_unsafe_view", "view",
})


class LaunchCounter:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` counts the launch and runs nothing."""

    def __init__(self, name: str, counts: Counter) -> None:
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.counts[self.name] += 1
        return launch


@contextmanager
def launches_counted():
    """Inside, every Triton kernel the fused ToM path launches is a :class:`LaunchCounter` (the kernels that
    :func:`perf.triton_ab.kernels_replaced` knows); yields the Counter (kernel name -> launches). The kernels are put
    back on the way out."""
    from perf.triton_ab import kernels_replaced

    counts: Counter = Counter()
    with kernels_replaced(lambda name, kernel: LaunchCounter(name, counts)):
        yield counts


class _OperatorLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def operator_counts(fn) -> tuple[int, int, Counter]:
    """``fn()``'s dispatcher calls: (non-view operators, view operators, Counter of the non-view ones by name)."""
    with _OperatorLog() as log:
        fn()
    others = Counter(n for n in log.names if n not in VIEW_OPS)
    return sum(others.values()), len(log.names) - sum(others.values()), others


@contextmanager
def _fused_path_on_cpu():
    """``TRITON_INTERPRET=1`` while inside: what lets the fused ToM path run off a GPU (the launches being counters,
    nothing is interpreted). Set after the kernels' modules are imported, so they stay compiled kernels."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def measure(dim: int = 8, side: int = 4, steps: int = 300, repeats: int = 5, precision: str = "bf16") -> dict:
    """Host time per forward and per backward of one ToM layer (median over ``repeats`` runs of ``steps`` steps,
    in µs), the dispatcher calls of each, and the launches per forward + backward. ``precision``: ``bf16`` runs the
    forward under the CPU's bf16 autocast, as training runs it under CUDA's: the casts autocast adds are part of the
    work. The map is fp32, for which both autocasts cast the same (the projections' inputs and weights); a bf16 map
    would differ, CUDA's autocast casting it to fp32 for the LayerNorm and the CPU's not. ``fp32``: no autocast."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    from segresmamba.ssm.tom import TriOrientedMamba

    torch.manual_seed(0)
    layer = TriOrientedMamba(dim, scan_backend="triton")
    x = torch.randn(1, dim, side, side, side, requires_grad=True)
    params = [*layer.parameters(), x]

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return layer(x)

    grad = {dtype: torch.ones_like(x, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}  # made once, outside

    def backward(y):
        y.backward(grad[y.dtype])

    def clear():  # a training step starts with no gradients (zero_grad sets them to None)
        for p in params:
            p.grad = None

    with launches_counted() as launches, _fused_path_on_cpu():
        if not layer._use_fused(x, side):
            raise RuntimeError("the fused ToM path did not engage: is Triton installed?")
        for _ in range(10):  # warm-up: caches, allocator
            clear()
            backward(forward())
        if not launches:
            raise RuntimeError("no Triton launch was counted: the fused ToM path's kernels were not replaced")
        launches.clear()
        clear()
        y = forward()
        fwd_launches = sum(launches.values())
        backward(y)
        step_launches = dict(launches)
        clear()
        fwd_ops, fwd_views, fwd_names = operator_counts(forward)
        y = forward()
        bwd_ops, bwd_views, bwd_names = operator_counts(lambda: backward(y))
        fwd_us, bwd_us = [], []
        for _ in range(repeats):
            t_fwd = t_bwd = 0.0
            for _ in range(steps):
                clear()
                t0 = time.perf_counter()
                y = forward()
                t1 = time.perf_counter()
                backward(y)
                t_bwd += time.perf_counter() - t1
                t_fwd += t1 - t0
            fwd_us.append(t_fwd / steps * 1e6)
            bwd_us.append(t_bwd / steps * 1e6)
    return {
        "dim": dim, "side": side, "steps": steps, "repeats": repeats, "precision": precision,
        "forward_us": statistics.median(fwd_us), "backward_us": statistics.median(bwd_us),
        "forward_ops": fwd_ops, "forward_views": fwd_views, "forward_by_name": fwd_names,
        "backward_ops": bwd_ops, "backward_views": bwd_views, "backward_by_name": bwd_names,
        "forward_launches": fwd_launches, "launches": step_launches,
    }


def report(m: dict, prov: dict) -> str:
    def names(counter: Counter) -> str:
        return ", ".join(f"{n} {c}" for n, c in counter.most_common())

    total = m["forward_us"] + m["backward_us"]
    launches = sum(m["launches"].values())
    return "\n".join([
        "# Host work of one fused ToM layer, its Triton launches counted, not run",
        "",
        f"{prov['device']} · git {prov['git_sha']} · torch {prov['versions'].get('torch')} · triton "
        f"{prov['versions'].get('triton', 'none')} · {m['precision']}{' (autocast)' if m['precision'] == 'bf16' else ''}, synthetic "
        f"tensors · `python -m perf.tom_host --precision {m['precision']} --dim {m['dim']} "
        f"--side {m['side']} --steps {m['steps']} --repeats {m['repeats']}`",
        "",
        f"ToM layer (dim {m['dim']}, three branches, depth-first slices) on a 1 x {m['dim']} x {m['side']}^3 map, the fused "
        "path on the CPU, every Triton launch replaced by a counter. Times: median of the repeats, per step; they are "
        "the host's work around the launches (Python, dispatcher, autograd) plus these small CPU operators' compute.",
        "",
        "| | host µs | dispatcher calls (views apart) | views | Triton launches |",
        "|---|--:|--:|--:|--:|",
        f"| forward | {m['forward_us']:.0f} | {m['forward_ops']} | {m['forward_views']} | {m['forward_launches']} |",
        f"| backward | {m['backward_us']:.0f} | {m['backward_ops']} | {m['backward_views']} | {launches - m['forward_launches']} |",
        f"| step | {total:.0f} | {m['forward_ops'] + m['backward_ops']} | {m['forward_views'] + m['backward_views']} | {launches} |",
        "",
        f"- Forward operators: {names(m['forward_by_name'])}.",
        f"- Backward operators: {names(m['backward_by_name'])}.",
        f"- Launches per step: {', '.join(f'`{k}` {v}' for k, v in sorted(m['launches'].items()))}.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=8, help="ToM channels (default 8: small, so the CPU's compute is slight)")
    p.add_argument("--side", type=int, default=4, help="side of the cubic map; also its slices (default 4)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16: under autocast, as training (default)")
    p.add_argument("--out", type=Path, help="write tom_host.md there (default: print only)")
    args = p.parse_args(argv)
    if args.dim < 1 or args.side < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--dim, --side, --steps and --repeats must be >= 1")
    from segresmamba.provenance import provenance

    text = report(measure(args.dim, args.side, args.steps, args.repeats, args.precision), provenance("cpu", args.precision))
    publish(text, args.out, "tom_host.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
