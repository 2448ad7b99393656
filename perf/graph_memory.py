"""Where the memory of the whole-step CUDA graphs goes: their private pool against the tensors alive in it.

The fastest mode (:mod:`segresmamba.step_graphs`) holds its graphs' memory pool for the whole run. That pool is at
least the largest set of the capture's tensors alive at once; what the caching allocator cannot reuse (the free ends
of segments that no later request fits) comes on top. This tool captures the suite's training step of a model
(:class:`segresmamba.step_graphs.TrainingGraph`, its eager warm-up included) while the allocator records its history
(``torch.cuda.memory._record_memory_history``) and reports:

- the pool after the capture: its segments, their size, and the bytes no tensor holds;
- the bytes of the pool's tensors alive over the capture, their peak, and the tensors alive at that peak grouped by
  the source line that allocated them (the suite's frames; an empty source is an allocation made inside PyTorch's
  C++, such as autograd's gradient buffers).

    python -m perf.graph_memory --model segresmamba --fast-norms --out results/perf

writes ``graph_memory_<model>_<config>[_fast_norms][_channels_last].md``. CUDA only. The capture allocates its pool
in expandable segments unless ``PYTORCH_CUDA_ALLOC_CONF`` chooses the segments
(:func:`segresmamba.ssm.cuda_graphs.expandable_segments`): run it with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False`` to see the pool in the allocator's default segments.
"""

from __future__ import annotations

import argparse
import bisect
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

import segresmamba
from perf.step_profile import NORMS_TEXT, add_step_arguments, write_step_report
from segresmamba.bench.efficiency import is_graph_pool_segment
from segresmamba.bench.step import build_task, synthetic_batch
from segresmamba.data.spec import get_dataset_spec
from segresmamba.provenance import provenance

GIB, MIB = 2**30, 2**20
# frames named in a source: the suite's own code and the libraries whose modules allocate for it
SOURCE_PATHS = ("/segresmamba/", "/perf/", "/monai/", "torch/cuda/graphs.py")
HISTORY_ENTRIES = 2_000_000


@dataclass
class PoolSummary:
    """What :func:`pool_summary` finds in a snapshot (bytes)."""

    segments: list[int]  # each pool segment's size
    free_after: int  # pool bytes no tensor holds at the snapshot
    peak_live: int  # the largest sum of the pool's live tensors over the trace
    peak_event: int  # the trace index where that peak was reached
    events: int
    live_at_peak: Counter = field(default_factory=Counter)  # source -> bytes alive at the peak
    count_at_peak: Counter = field(default_factory=Counter)  # source -> tensors alive at the peak


def source_of(frames: list[dict], depth: int = 3) -> str:
    """``file:line:function`` of the innermost ``depth`` frames under :data:`SOURCE_PATHS`, innermost first."""
    kept = [f for f in frames if any(p in f.get("filename", "") for p in SOURCE_PATHS)]
    return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in kept[:depth])


def pool_summary(snapshot: dict, device: int = 0) -> PoolSummary:
    """The private (CUDA-graph) pools of ``device`` in a ``torch.cuda.memory._snapshot()``: their segments, and the
    live bytes of their tensors over the recorded trace.

    The pool's segments outlive the trace, so an allocation at an address inside one of them is the pool's if it
    came after the last release of memory at that address (``segment_free``, ``segment_unmap``): before it, the
    address may have belonged to another segment, such as one of the eager warm-up's."""
    segments = [s for s in snapshot["segments"] if is_graph_pool_segment(s, device)]
    ranges = sorted((s["address"], s["address"] + s["total_size"]) for s in segments)
    starts = [lo for lo, _ in ranges]

    def pool_range(addr: int) -> int | None:
        i = bisect.bisect_right(starts, addr) - 1
        return i if i >= 0 and addr < ranges[i][1] else None

    trace = snapshot.get("device_traces", [[]] * (device + 1))[device]
    born = [-1] * len(ranges)  # per pool segment: the last event that released memory overlapping it
    for i, event in enumerate(trace):
        if event["action"] in ("segment_free", "segment_unmap"):
            lo, hi = event["addr"], event["addr"] + event["size"]
            for j, (s_lo, s_hi) in enumerate(ranges):
                if lo < s_hi and s_lo < hi:
                    born[j] = i
    live: dict[int, tuple[int, int]] = {}
    total = peak = 0
    peak_at = -1
    at_peak: dict[int, tuple[int, int]] = {}
    for i, event in enumerate(trace):
        action, addr = event["action"], event.get("addr", 0)
        if action == "alloc":
            segment = pool_range(addr)
            if segment is not None and i > born[segment]:
                live[addr] = (event["size"], i)
                total += event["size"]
                if total > peak:
                    peak, peak_at, at_peak = total, i, dict(live)
        elif action == "free_requested" and addr in live:
            total -= live.pop(addr)[0]
    summary = PoolSummary(
        segments=sorted((s["total_size"] for s in segments), reverse=True),
        free_after=sum(s["total_size"] - s["allocated_size"] for s in segments),
        peak_live=peak, peak_event=peak_at, events=len(trace),
    )
    for size, i in at_peak.values():
        where = source_of(trace[i].get("frames", []))
        summary.live_at_peak[where] += size
        summary.count_at_peak[where] += 1
    return summary


def capture_with_history(task, batch: dict, precision: str) -> tuple[dict, dict]:
    """``task``'s whole-step graphs captured for ``batch`` while the allocator records its history; returns the
    snapshot and the capture's ``max_memory_allocated`` / ``memory_reserved`` (bytes). The graphs are freed after."""
    from segresmamba.step_graphs import TrainingGraph

    dtype = torch.bfloat16 if precision == "bf16" else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES, stacks="python")
    try:
        graph = TrainingGraph(task, batch["image"], batch["label"], dtype)
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    stats = {"max_allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.memory_reserved()}
    del graph
    return snapshot, stats


def report(summary: PoolSummary, stats: dict, title: str, facts: str, top: int = 25) -> list[str]:
    sizes = Counter(round(s / MIB) for s in summary.segments)
    lines = [
        f"# {title}", "", facts, "",
        "| pool segments | pool GiB | pool's live tensors at their peak, GiB | pool GiB no tensor holds after the capture | "
        "max allocated during the capture (eager warm-up included), GiB | reserved after the capture, GiB |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {len(summary.segments)} | {sum(summary.segments) / GIB:.2f} | {summary.peak_live / GIB:.2f} | "
        f"{summary.free_after / GIB:.2f} | {stats['max_allocated'] / GIB:.2f} | {stats['reserved'] / GIB:.2f} |",
        "",
        "Segment sizes (MiB x count): " + ", ".join(f"{mib} x {n}" for mib, n in sorted(sizes.items(), reverse=True)[:20]) + ".",
        "",
        f"The peak is reached at event {summary.peak_event} of {summary.events} of the allocator's trace (the warm-up's "
        "events come first, then the forward graph's capture, then the backward's). Tensors alive in the pool at that "
        "moment, by the source that allocated them:",
        "",
        "| MiB | tensors | source (innermost first) |",
        "|---:|---:|---|",
    ]
    for where, size in summary.live_at_peak.most_common(top):
        lines.append(f"| {size / MIB:.1f} | {summary.count_at_peak[where]} | {f'`{where}`' if where else '(inside PyTorch)'} |")
    if len(summary.live_at_peak) > top:
        rest = sum(size for _, size in summary.live_at_peak.most_common()[top:])
        lines.append(f"| {rest / MIB:.1f} | | {len(summary.live_at_peak) - top} more sources |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(p)
    args = p.parse_args(argv)
    if args.model not in segresmamba.list_models():
        raise SystemExit(f"error: unknown model {args.model!r}; known models: {', '.join(segresmamba.list_models())}")
    if not torch.cuda.is_available():
        raise SystemExit("error: perf.graph_memory captures CUDA graphs and needs a GPU; CUDA is not available")
    device = torch.device("cuda")
    spec = get_dataset_spec(args.config)
    task = build_task(args.model, spec, recipe=args.recipe, channels_last=args.channels_last, fast_norms=args.fast_norms).to(device)
    snapshot, stats = capture_with_history(task, synthetic_batch(spec, spec.patch, device), args.precision)
    summary = pool_summary(snapshot, device.index or 0)
    prov = provenance(device, args.precision)
    layout = "NDHWC" if args.channels_last else "NCDHW"
    alloc_conf = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "unset"
    title = f"Memory of the whole-step CUDA graphs of {args.model}, {args.config} {'x'.join(map(str, spec.patch))} b1 {args.precision}, {layout}"
    facts = (f"{prov['device']} · git {prov['git_sha']} · torch {torch.__version__} · synthetic tensors, the suite's training step "
             f"(recipe {args.recipe}: forward, loss, backward) captured by `TrainingGraph`, norms: {NORMS_TEXT[args.fast_norms]}, "
             f"`PYTORCH_CUDA_ALLOC_CONF` {alloc_conf} (unset: the capture's pool in expandable segments). "
             "Pool = the graphs' private memory pool; its live tensors = the pool's allocations not yet freed, over the "
             "allocator's recorded trace. `python -m perf.graph_memory`.")
    write_step_report(args, "graph_memory", report(summary, stats, title, facts), echo_from=4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
