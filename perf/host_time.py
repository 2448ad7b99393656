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
- :func:`segresmamba.profiling.host.host_costs` (the efficiency profiler records it per GPU row): what one call of a
  few kinds of operation costs this host. ``python -m perf.host_time`` prints it for the current GPU, in a process
  that has imported nothing else.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from segresmamba.profiling.host import host_costs, host_costs_text, sync_device

__all__ = ["forward_host_by_module", "host_ops", "phase_host_ms"]


@contextmanager
def _timed(obj, attr: str):
    """``obj.attr`` wrapped, while inside, so that each call appends its duration in seconds to the yielded list;
    the instance attribute is removed afterwards (back to the class's method)."""
    fn, spent = getattr(obj, attr), []

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    setattr(obj, attr, run)
    try:
        yield spent
    finally:
        delattr(obj, attr)


def phase_host_ms(step, batch: dict, steps: int = 10) -> dict[str, float]:
    """Median host time per step of ``step`` (a :class:`segresmamba.bench.step.TrainingStep`) by phase, in ms:
    ``forward`` (the task's training step: forward and loss, under autocast), ``optimizer`` (its step),
    ``backward`` (the rest: backward, gradient clipping, zeroing the gradients) and ``step`` (the whole call)."""
    rows: dict[str, list[float]] = defaultdict(list)
    with _timed(step.task, "training_step") as forward, _timed(step.optimizer, "step") as optimizer:
        for _ in range(steps):
            sync_device(step.device)
            t0 = time.perf_counter()
            step(batch)
            total = (time.perf_counter() - t0) * 1e3
            sync_device(step.device)
            rows["forward"].append(forward[-1] * 1e3)
            rows["optimizer"].append(optimizer[-1] * 1e3)
            rows["backward"].append(total - rows["forward"][-1] - rows["optimizer"][-1])
            rows["step"].append(total)
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

    handles = [h for m in step.task.net.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with _timed(step.task, "training_step") as totals:
            step(batch)  # a warm-up with the hooks in place
            sync_device(step.device)
            own.clear(), calls.clear(), totals.clear()
            for _ in range(steps):
                step(batch)
                sync_device(step.device)
    finally:
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
    sync_device(step.device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(batch)
    sync_device(step.device)  # outside the profiled window: waiting for the GPU is no operator's host time
    rows = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("error: perf.host_time needs a GPU (CUDA is not available)")
    print(f"{torch.cuda.get_device_name()}: " + host_costs_text(host_costs(torch.device("cuda"))))
