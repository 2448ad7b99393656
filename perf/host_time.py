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
- :func:`host_python`: the host's time per Python function (cProfile's self time: a function's own lines,
  without the functions it calls; a C function such as an operator's binding counts as one), and the same
  summed by where the code lives (the suite, Triton, torch, ...): it shows the Python that the operator view leaves
  out, such as a kernel launcher's argument handling inside an autograd function's forward.
- :func:`gpu_idle`: where, inside synchronised steps, the GPU waits for the host: each gap between two kernels
  (and from the step's start to its first kernel) goes to what the host was running when it launched the kernel
  that ended the gap (the innermost module of the forward, the autograd node of the backward, the optimiser), from
  torch.profiler's trace (:func:`idle_by_context`). A step can be idle for long stretches although its host time
  is below its kernel time: wherever the host enqueues work more slowly than the GPU runs it, the queue drains.
- :func:`segresmamba.profiling.host.host_costs` (the efficiency profiler records it per GPU row): what one call of a
  few kinds of operation costs this host. ``python -m perf.host_time`` prints it for the current GPU, in a process
  that has imported nothing else.
"""

from __future__ import annotations

import bisect
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from segresmamba.profiling.host import host_costs, host_costs_text, sync_device

__all__ = ["forward_host_by_module", "gpu_idle", "host_ops", "host_python", "idle_by_context", "phase_host_ms", "python_origin"]

STEP_LABEL, MODULE_PREFIX, PHASE_PREFIX = "segresmamba::step", "module::", "phase::"
AUTOGRAD_PREFIX = "autograd::engine::evaluate_function: "
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


@contextmanager
def _wrapped(obj, attr: str, wrap):
    """``obj.attr`` replaced by ``wrap(obj.attr)`` while inside; the instance attribute is removed afterwards (back
    to the class's method)."""
    setattr(obj, attr, wrap(getattr(obj, attr)))
    try:
        yield
    finally:
        delattr(obj, attr)


@contextmanager
def _timed(obj, attr: str):
    """``obj.attr`` wrapped, while inside, so that each call appends its duration in seconds to the yielded list."""
    spent = []

    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - t0)
        return run

    with _wrapped(obj, attr, wrap):
        yield spent


def _labelled(obj, attr: str, label: str):
    """``obj.attr`` wrapped, while inside, so that each call runs inside a profiler range named ``label``."""
    def wrap(fn):
        def run(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return run

    return _wrapped(obj, attr, wrap)


@contextmanager
def _forward_hooks(net: torch.nn.Module, pre, post):
    """``pre`` and ``post`` as forward pre- and post-hooks of every module of ``net``, while inside."""
    handles = [h for m in net.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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

    with _forward_hooks(step.task.net, pre, post), _timed(step.task, "training_step") as totals:
        step(batch)  # a warm-up with the hooks in place
        sync_device(step.device)
        own.clear(), calls.clear(), totals.clear()
        for _ in range(steps):
            step(batch)
            sync_device(step.device)
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


# where a Python function's code lives, by a directory in its file's path (the first that matches); C functions
# (``{built-in method ...}``) are "builtins"
ORIGINS = (("segresmamba", "/segresmamba/"), ("perf", "/perf/"), ("triton", "/triton/"), ("torch", "/torch/"),
           ("lightning", "/lightning"), ("monai", "/monai/"))


def python_origin(filename: str) -> str:
    """Where the code of a profiled function lives: the suite, its perf tools, Triton, torch, Lightning, MONAI,
    ``builtins`` (C functions, cProfile's ``~``), or ``other`` (the standard library and the rest)."""
    if filename == "~":
        return "builtins"
    path = filename.replace("\\", "/")
    return next((name for name, part in ORIGINS if part in path), "other")


def host_python(step, batch: dict, steps: int = 3) -> tuple[list[tuple[str, str, float, float, int]], dict[str, float]]:
    """The host's time per Python function over whole steps (cProfile, after a warm-up step; the device is synchronised
    after the profiled steps, outside the window): [(function, origin, self ms per step, cumulative ms per step,
    calls per step)], largest self time first, and the self time per step summed by origin (:func:`python_origin`),
    largest first. cProfile adds its own cost to every call it sees, so the figures are relative, not absolute."""
    import cProfile
    import pstats

    step(batch)
    sync_device(step.device)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        for _ in range(steps):
            step(batch)
    finally:
        profiler.disable()
    sync_device(step.device)
    rows, origins = [], defaultdict(float)
    for (filename, line, name), (_, calls, own, cumulative, _) in pstats.Stats(profiler).stats.items():
        origin = python_origin(filename)
        where = name if filename == "~" else f"{Path(filename).name}:{line}({name})"
        rows.append((where, origin, own * 1e3 / steps, cumulative * 1e3 / steps, calls // steps))
        origins[origin] += own * 1e3 / steps
    rows.sort(key=lambda r: -r[2])
    return rows, dict(sorted(origins.items(), key=lambda kv: -kv[1]))


def _module_ranges(net: torch.nn.Module):
    """A profiler range ``module::<class>`` around each module call of ``net``'s forward, while inside."""
    open_ranges: list = []

    def pre(module, _args):
        rf = torch.profiler.record_function(MODULE_PREFIX + type(module).__name__)
        rf.__enter__()
        open_ranges.append(rf)

    def post(_module, _args, _out):
        open_ranges.pop().__exit__(None, None, None)

    return _forward_hooks(net, pre, post)


def _context(name: str) -> str | None:
    """The row a labelled CPU range stands for, or None for ranges that name no context."""
    if name.startswith(MODULE_PREFIX):
        return "forward: " + name[len(MODULE_PREFIX):]
    if name.startswith(AUTOGRAD_PREFIX):
        return "backward: " + name[len(AUTOGRAD_PREFIX):]
    if name.startswith(PHASE_PREFIX):
        return name[len(PHASE_PREFIX):]
    return None


def idle_by_context(events: list[dict], min_gap_us: float = 2.0) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """GPU idle time inside the steps of a chrome trace (torch.profiler's ``export_chrome_trace``), by context.

    A step is a CPU range named :data:`STEP_LABEL`, entered with the GPU idle; its GPU work is every kernel, copy or
    memset launched inside it (matched to its launch by the ``correlation`` id). The idle time of a step: from the
    step's start to its first GPU event, and every gap of at least ``min_gap_us`` between the end of all earlier GPU
    work and the next event. Each such wait goes to the context of the launch that ended it: the innermost
    labelled CPU range around the launch on the launching thread (:func:`_context`), else ``(other)``.

    Returns totals per step in ms (``steps``, ``idle``, ``busy``: the union of GPU work) and [(context, idle ms
    per step, waits per step)], largest first."""
    launches = {e["args"]["correlation"]: (e["ts"], e.get("tid")) for e in events
                if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    ranges: dict = defaultdict(list)  # tid -> [(start, end, context)] sorted by start
    steps = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("cpu_op", "user_annotation"):
            continue
        if e["name"] == STEP_LABEL:
            steps.append((e["ts"], e["ts"] + e["dur"]))
        elif (context := _context(e["name"])) is not None:
            ranges[e.get("tid")].append((e["ts"], e["ts"] + e["dur"], context))
    for rows in ranges.values():
        rows.sort()
    starts = {tid: [r[0] for r in rows] for tid, rows in ranges.items()}

    def context_at(ts: float, tid) -> str:
        rows = ranges.get(tid, [])
        for i in range(bisect.bisect_right(starts.get(tid, []), ts) - 1, -1, -1):  # the latest-starting range around ts
            if rows[i][1] >= ts:
                return rows[i][2]
        return "(other)"

    gpu = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES and e.get("args", {}).get("correlation") in launches:
            gpu.append((e["ts"], e["ts"] + e.get("dur", 0.0), *launches[e["args"]["correlation"]]))
    gpu.sort()
    idle: dict[str, float] = defaultdict(float)
    waits: dict[str, int] = defaultdict(int)
    idle_total = busy_total = 0.0
    for s0, s1 in steps:
        inside = [g for g in gpu if s0 <= g[2] <= s1]
        if not inside:
            continue
        ready = s0  # when the GPU had finished all earlier work of the step
        for start, end, launched, tid in inside:
            gap = start - ready
            if gap >= min_gap_us or ready == s0:
                context = context_at(launched, tid)
                idle[context] += max(gap, 0.0)
                waits[context] += 1
                idle_total += max(gap, 0.0)
            busy_total += max(end - max(start, ready), 0.0)
            ready = max(ready, end)
    n = max(len(steps), 1)
    rows = sorted(((c, ms / 1e3 / n, waits[c] // n) for c, ms in idle.items()), key=lambda r: -r[1])
    return {"steps": len(steps), "idle": idle_total / 1e3 / n, "busy": busy_total / 1e3 / n}, rows


def gpu_idle(step, batch: dict, steps: int = 3, min_gap_us: float = 2.0) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Where the GPU waits for the host in ``steps`` steps of ``step`` (a :class:`segresmamba.bench.step.TrainingStep`),
    each entered with the GPU idle: :func:`idle_by_context` of a torch.profiler trace, with the forward's modules,
    the forward and loss, and the optimiser step labelled. The labels' own cost (a profiler range per module call)
    is in the host's time, so the waits are a little longer than in an unlabelled step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    with ExitStack() as stack:
        stack.enter_context(_module_ranges(step.task.net))
        stack.enter_context(_labelled(step.task, "training_step", PHASE_PREFIX + "forward (outside modules)"))
        stack.enter_context(_labelled(step.optimizer, "step", PHASE_PREFIX + "optimiser"))
        step(batch)  # a warm-up with the labels in place
        sync_device(step.device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                sync_device(step.device)
                with torch.profiler.record_function(STEP_LABEL):
                    step(batch)
                sync_device(step.device)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return idle_by_context(events, min_gap_us)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("error: perf.host_time needs a GPU (CUDA is not available)")
    print(f"{torch.cuda.get_device_name()}: " + host_costs_text(host_costs(torch.device("cuda"))))
