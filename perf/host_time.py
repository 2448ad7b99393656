"""Where the host's time goes in a training step: by phase, by module of the forward, and by operator.

A step bound by the host (wall time well above its GPU kernels' sum, :mod:`perf.step_profile`) is as fast as
the Python and dispatcher work that enqueues its kernels. These measures say which part of that work to cut:

- :func:`phase_host_ms`: the host's time to enqueue the forward and loss, the backward and the optimiser step,
  the GPU being idle at the start of each step (synchronised before, not after), so that the host never waits
  for a full launch queue. On the CPU every kernel runs on the host and these are the phases' whole times.
- :func:`forward_host_by_module`: the forward's host time by module class, exclusive of the module's
  children, from forward pre- and post-hooks (the hooks' own cost, a few microseconds per module call, is in
  the figures).
- :func:`host_ops`: the host's time per operator (the dispatcher's self time, torch.profiler's CPU events,
  forward and backward together) and how often each runs per step; time spent in Python between operators is
  not in any operator's self time.
- :func:`host_costs`: what one call of a few kinds of operation costs this host (an elementwise op, a cuBLAS GEMM,
  a cuDNN 3D convolution, a Triton kernel launch): the figures that make eager step times of different machines
  comparable, since a step bound by its host is as fast as its host.

``python -m perf.host_time`` prints :func:`host_costs` for the current GPU.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch

__all__ = ["forward_host_by_module", "host_costs", "host_ops", "phase_host_ms"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_host_ms(step, batch: dict, steps: int = 10) -> dict[str, float]:
    """Median host time per step of ``step`` (a :class:`segresmamba.bench.step.TrainingStep`) by phase, in ms:
    ``forward`` (the task's training step: forward and loss, under autocast), ``optimizer`` (its step),
    ``backward`` (the rest: backward, gradient clipping, zeroing the gradients) and ``step`` (the whole call)."""
    task, optimizer = step.task, step.optimizer
    spent: dict[str, float] = {}

    def timed(name: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = (time.perf_counter() - t0) * 1e3
        return run

    task.training_step = timed("forward", task.training_step)
    optimizer.step = timed("optimizer", optimizer.step)
    rows: dict[str, list[float]] = defaultdict(list)
    try:
        for _ in range(steps):
            _sync(step.device)
            t0 = time.perf_counter()
            step(batch)
            total = (time.perf_counter() - t0) * 1e3
            _sync(step.device)
            rows["forward"].append(spent["forward"])
            rows["backward"].append(total - spent["forward"] - spent["optimizer"])
            rows["optimizer"].append(spent["optimizer"])
            rows["step"].append(total)
    finally:
        del task.training_step, optimizer.step  # back to the class's methods
    return {name: statistics.median(values) for name, values in rows.items()}


def forward_host_by_module(step, batch: dict, steps: int = 3) -> list[tuple[str, float, int]]:
    """The forward's host time by module class, exclusive of children: [(class name, ms per step, calls per
    step)], largest first. The task's loss and anything outside a module call count as ``(outside modules)``."""
    own: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    stack: list[list] = []  # [class name, start, children's time]

    def pre(module, _args):
        stack.append([type(module).__name__, time.perf_counter(), 0.0])

    def post(module, _args, _out):
        name, t0, children = stack.pop()
        spent = time.perf_counter() - t0
        own[name] += spent - children
        calls[name] += 1
        if stack:
            stack[-1][2] += spent

    modules = [m for m in step.task.net.modules()]
    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    task_step = step.task.training_step
    totals = []

    def timed_step(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return task_step(*args, **kwargs)
        finally:
            totals.append(time.perf_counter() - t0)

    step.task.training_step = timed_step
    try:
        step(batch)  # a warm-up with the hooks in place
        _sync(step.device)
        own.clear(), calls.clear(), totals.clear()
        for _ in range(steps):
            step(batch)
            _sync(step.device)
    finally:
        del step.task.training_step
        for h in handles:
            h.remove()
    outside = sum(totals) - sum(own.values())
    rows = [(name, ms * 1e3 / steps, calls[name] // steps) for name, ms in own.items()]
    rows.append(("(outside modules)", outside * 1e3 / steps, 0))
    return sorted(rows, key=lambda r: -r[1])


def host_ops(step, batch: dict, steps: int = 3) -> tuple[list[tuple[str, float, int]], float]:
    """Host self time per operator over whole steps: [(operator, ms per step, calls per step)], largest
    first, and the summed self time per step in ms (torch.profiler's CPU events, after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    step(batch)
    _sync(step.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(batch)
    _sync(step.device)  # outside the profiled window: waiting for the GPU is no operator's host time
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows)


def _per_call_us(fn: Callable, device: torch.device, calls: int, warmup: int = 10) -> float:
    """Median over 5 rounds of the host's time per call of ``fn``, ``calls`` calls back to back per round (the
    GPU idle at the start of each round, so small kernels never fill the launch queue)."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    _sync(device)
    return statistics.median(rounds)


def host_costs(device: torch.device, calls: int = 50) -> dict[str, float | None]:
    """Host microseconds per call of: ``elementwise`` (an add of two 1,024-element tensors), ``gemm``
    (``F.linear`` of a 512 x 96 input by a 48 x 96 weight, bf16 on CUDA, fp32 on a CPU), ``conv3d`` (cuDNN, bf16,
    1 x 8 x 16^3 by an 8 x 8 x 3^3 kernel; CUDA only) and ``triton_launch`` (the selective scan's carry kernel on
    a tiny input, its output allocation included; CUDA with Triton only). None where not measured. On a CPU the
    figures include the computation itself."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(1024, device=device), torch.randn(1024, device=device)
    x, w = torch.randn(512, 96, device=device, dtype=dtype), torch.randn(48, 96, device=device, dtype=dtype)
    costs: dict[str, float | None] = {
        "elementwise": _per_call_us(lambda: torch.add(a, b), device, calls),
        "gemm": _per_call_us(lambda: torch.nn.functional.linear(x, w), device, calls),
        "conv3d": None,
        "triton_launch": None,
    }
    if cuda:
        v, k = torch.randn(1, 8, 16, 16, 16, device=device, dtype=dtype), torch.randn(8, 8, 3, 3, 3, device=device, dtype=dtype)
        costs["conv3d"] = _per_call_us(lambda: torch.nn.functional.conv3d(v, k, padding=1), device, calls)
        from segresmamba.ssm.triton import triton_available

        if triton_available():
            from segresmamba.ssm.triton.autograd import _run_carry

            decay, local = torch.rand(1, 4, 8, 16, device=device), torch.randn(1, 4, 8, 16, device=device)
            costs["triton_launch"] = _per_call_us(lambda: _run_carry(decay, local, reverse=False), device, calls)
    return costs


def host_costs_text(costs: dict[str, float | None]) -> str:
    """One line: the host's cost per call of each kind of :func:`host_costs`."""
    names = {"elementwise": "elementwise op", "gemm": "GEMM", "conv3d": "cuDNN conv3d", "triton_launch": "Triton launch"}
    return ", ".join(f"{names[k]} {v:.1f} µs" for k, v in costs.items() if v is not None) + " per call"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("error: perf.host_time needs a GPU (CUDA is not available)")
    print(f"{torch.cuda.get_device_name()}: " + host_costs_text(host_costs(torch.device("cuda"))))
