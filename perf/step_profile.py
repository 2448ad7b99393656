"""What bounds a whole-model training step on the GPU: kernel time against wall time, per step.

A step whose wall time is well above the sum of its GPU kernels is bound by the host (kernel launches and
Python), not by the GPU; CUDA graphs then help and faster kernels do not. One run, one device, each mode
after the other on the same model and batch (synthetic tensors, batch 1). The step is the suite's
(:mod:`segresmamba.bench.step`): ``SegmentationTask.training_step`` of the model as ``configs/model/<model>.yaml``
configures it, with the recipe's loss, backward and optimiser step:

    python -m perf.step_profile --model segresmamba --config brats --out results/perf

writes ``step_profile_<model>_<config>.md``: per mode (``eager``; ``cuda_graphs``: the small ToM layers
replaying CUDA graphs, :mod:`segresmamba.ssm.cuda_graphs`; ``step_graphs``: the whole forward, loss and
backward replaying CUDA graphs, :mod:`segresmamba.step_graphs`), the median wall time of a step, the GPU
kernel time and launches per step (torch.profiler), the kernel time by kind and the largest kernels.
Per mode it also records the host's time to enqueue a step by phase, where in the step the GPU waits for the host
(:func:`perf.host_time.gpu_idle`), and for ``eager`` the forward's host time by module class and the host's time by
operator and by Python function (:mod:`perf.host_time`), to show where a host-bound step spends it.
``--fast-norms`` profiles the nets with ``fast_norms`` (the fastest mode is ``step_graphs`` with it) and writes
``step_profile_<model>_<config>_fast_norms.md``; ``--fast-norms group`` with ``fast_norms="group"`` (GroupNorm only),
``step_profile_<model>_<config>_fast_group_norms.md``. ``--channels-last`` keeps the 3D conv weights and the input in
NDHWC (the task's ``channels_last``) and adds ``_channels_last`` to the name: it shows which kernels the layout
removes (cuDNN's NCDHW <-> NDHWC conversions) and which it adds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch

import segresmamba
from perf.host_time import forward_host_by_module, gpu_idle, host_ops, host_python, phase_host_ms
from perf.scan_bench import kernel_breakdown
from segresmamba.bench.efficiency import PROFILED_DATASETS, fast_norms_choice, release_graphs
from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
from segresmamba.data.spec import get_dataset_spec
from segresmamba.profiling.host import host_costs, host_costs_text
from segresmamba.provenance import provenance
from segresmamba.ssm.cuda_graphs import graph_tom_layers
from segresmamba.step_graphs import TrainingGraph

MODES = ("eager", "cuda_graphs", "step_graphs")


def variant_suffix(fast_norms: bool | str, channels_last: bool) -> str:
    """The file-name suffix of a step's variant: its norms (``--fast-norms``) and its layout (``--channels-last``)."""
    return {False: "", True: "_fast_norms", "group": "_fast_group_norms"}[fast_norms] + ("_channels_last" if channels_last else "")


NORMS_TEXT = {False: "PyTorch kernels", True: "whole-tensor (`--model.fast_norms true`)",
               "group": "GroupNorm whole-tensor, InstanceNorm PyTorch's (`--model.fast_norms group`)"}


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a tool that examines one training step (this profile, ``perf.layout_audit``,
    ``perf.graph_memory``): the model, its dataset configuration, recipe and precision, the step's variant
    (norms, layout) and where the report goes."""
    p.add_argument("--model", default="segresmamba")
    p.add_argument("--config", default="brats", choices=list(PROFILED_DATASETS), help="dataset whose paper configuration is used")
    p.add_argument("--recipe", default="paper", help="training recipe of the step: its loss, and its optimiser where the tool runs one")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--fast-norms", nargs="?", const=True, default=False, type=fast_norms_choice,
                   help="GroupNorm and InstanceNorm by whole-tensor reductions (--model.fast_norms); `--fast-norms group`: GroupNorm only")
    p.add_argument("--channels-last", action="store_true",
                   help="3D conv weights and the input in channels_last_3d (NDHWC) layout (--model.channels_last)")
    p.add_argument("--out", type=Path, default=Path("results/perf"))


def write_step_report(args: argparse.Namespace, kind: str, lines: list[str], echo_from: int | None = None) -> Path:
    """``lines`` written to ``<out>/<kind>_<model>_<config><variant suffix>.md``; with ``echo_from``, the lines from
    there on are printed too (the report without its title and facts)."""
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"{kind}_{args.model}_{args.config}{variant_suffix(args.fast_norms, args.channels_last)}.md"
    dest.write_text("\n".join(lines) + "\n")
    if echo_from is not None:
        print("\n".join(lines[echo_from:]))
    print(f"wrote {dest}")
    return dest


TOP = 15
HOST_TOP = 25
# kernel kinds, first match wins (names as the profiler reports them)
KINDS = (
    ("selective scan (Triton)", r"^_(fwd|bwd)_(chunk_state|output|grad)|^_carry_kernel"),
    ("selective scan (mamba_ssm)", r"selective_scan"),
    ("oriented causal conv (Triton)", r"^_conv_(fwd|bwd)"),
    ("3D convolution (cuDNN)", r"xmma|cudnn|implicit_gemm|conv_depthwise|convolution|nchwToNhwc|nhwcToNchw|dgrad|wgrad|fprop"),
    # the whole-tensor GroupNorm/InstanceNorm kernels (segresmamba.models.group_norm_kernels) by their names
    ("normalisation", r"norm|Moments|GroupNorm|LayerNorm|welford|batch_norm|InternalGradients|GammaBeta"
                      r"|^_(stats|finalize|apply|grad_sums|grad_coeff|grad_input)(_cl)?_kernel$"),
    ("matmul (GEMM)", r"gemm|cutlass|sm90_|ampere_|cublas"),
    ("optimiser", r"multi_tensor|adam|Adam"),
    ("reductions", r"reduce_kernel|Reduce"),
    ("elementwise and copies", r"elementwise|copy|fill|Memset|Memcpy|cat|index|scatter|gather|upsample|interpolate"),
)


def kinds_of(table: list[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
    """Kernel time and launches per step by kind (:data:`KINDS`), largest first."""
    totals: dict[str, list] = {}
    for name, ms, n in table:
        kind = next((k for k, pattern in KINDS if re.search(pattern, name)), "other")
        entry = totals.setdefault(kind, [0.0, 0])
        entry[0] += ms
        entry[1] += n
    return sorted(((k, ms, n) for k, (ms, n) in totals.items()), key=lambda r: -r[1])


def wall_ms(step, batch: dict, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_sections(step, batch: dict) -> list[str]:
    """The eager step's host time by module class of the forward, by operator and by Python function
    (:mod:`perf.host_time`)."""
    by_module = forward_host_by_module(step, batch)
    ops, ops_total = host_ops(step, batch)
    out = ["", "## eager: the forward's host time by module class (exclusive of children; forward hooks)", "",
           f"{sum(r[1] for r in by_module):.1f} ms per step in all.", "",
           "| module class | host ms / step | calls / step |", "|---|---:|---:|"]
    out += [f"| {name} | {ms:.2f} | {n} |" for name, ms, n in by_module[:HOST_TOP]]
    out += ["", "## eager: host self time by operator (torch.profiler CPU events, forward and backward)", "",
            f"{ops_total:.1f} ms per step of operator self time in all, under the profiler (which adds its own cost "
            "per event).", "", "| operator | host ms / step | calls / step |", "|---|---:|---:|"]
    out += [f"| `{name[:90]}` | {ms:.2f} | {n} |" for name, ms, n in ops[:HOST_TOP]]
    functions, origins = host_python(step, batch)
    out += ["", "## eager: the host's Python time by function (cProfile self time, forward, backward and optimiser)", "",
            f"{sum(origins.values()):.1f} ms per step of self time in all, under cProfile (which adds its own cost per "
            "call); by where the code lives: " + ", ".join(f"{origin} {ms:.1f}" for origin, ms in origins.items()) + " ms.",
            "", "| function | code | self ms / step | cumulative ms / step | calls / step |", "|---|---|---:|---:|---:|"]
    out += [f"| `{name[:90]}` | {origin} | {own:.2f} | {cumulative:.2f} | {n} |"
            for name, origin, own, cumulative, n in functions[:HOST_TOP]]
    return out


def profile(model_name: str, config: str, precision: str, modes: list[str], steps: int, warmup: int, recipe: str = "paper",
            fast_norms: bool | str = False, channels_last: bool = False, top: int = TOP) -> list[str]:
    spec = get_dataset_spec(config)
    torch.backends.cudnn.benchmark = True  # as the training configs
    torch.manual_seed(0)
    device = torch.device("cuda")
    step = TrainingStep(build_task(model_name, spec, recipe=recipe, fast_norms=fast_norms, channels_last=channels_last), precision, device)
    batch = synthetic_batch(spec, spec.patch, device)
    model, x, dtype = step.task.net, batch["image"], step.dtype
    prov = provenance(device, precision)
    lines = [f"# Training step of {model_name}, {config} {'x'.join(map(str, spec.patch))} b1 {precision}: GPU kernels against wall time", "",
             f"{prov['device']} · git {prov['git_sha']} · torch {prov['versions'].get('torch')} · triton {prov['versions'].get('triton')} · "
             f"synthetic tensors, the suite's training step (recipe {recipe}: task loss, backward, optimiser step), "
             f"norms: {NORMS_TEXT[fast_norms]}, layout: {'NDHWC (`--model.channels_last true`)' if channels_last else 'NCDHW'}, "
             f"`cudnn.benchmark` on. Wall: median of {steps} steps after {warmup} warm-ups "
             "(CUDA synchronised around each). Kernels: torch.profiler, mean of 3 steps. Names are cut at 90 characters.", "",
             "Host: the host's time to enqueue a step, the GPU idle at its start (synchronised before each step, not inside "
             "it), median of the same steps; forward = forward and loss, backward = backward, clipping and zeroing the "
             "gradients, optimiser = its step. A host-bound step is as fast as its host; this host, before the steps: "
             f"{host_costs_text(host_costs(device))}.", "",
             "| mode | ToM layers in CUDA graphs | wall ms / step | GPU kernel ms / step | kernel share of wall | launches / step "
             "| host ms / step | host forward | host backward | host optimiser | GPU idle ms / step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sections = []
    for mode in modes:
        graphed = graph_tom_layers(model, x, dtype) if mode == "cuda_graphs" else []
        step.task.step_graph = TrainingGraph(step.task, x, batch["label"], dtype) if mode == "step_graphs" else None
        for _ in range(warmup):
            step(batch)
        ms = wall_ms(step, batch, steps)
        host = phase_host_ms(step, batch, steps)
        idle, waits = gpu_idle(step, batch)
        table, total = kernel_breakdown(lambda: step(batch), iters=3)
        launches = sum(r[2] for r in table)
        in_graphs = "all (whole step)" if mode == "step_graphs" else len(graphed)
        lines.append(f"| {mode} | {in_graphs} | {ms:.1f} | {total:.1f} | {total / ms:.0%} | {launches} | {host['step']:.1f} "
                     f"| {host['forward']:.1f} | {host['backward']:.1f} | {host['optimizer']:.1f} | {idle['idle']:.1f} |")
        sections += ["", f"## {mode}: kernel time by kind", "", "| kind | ms / step | share | launches |", "|---|---:|---:|---:|"]
        sections += [f"| {kind} | {k_ms:.2f} | {k_ms / total:.0%} | {n} |" for kind, k_ms, n in kinds_of(table)]
        sections += ["", f"## {mode}: largest kernels", "", "| kernel | ms / step | launches |", "|---|---:|---:|"]
        sections += [f"| `{name[:90]}` | {k_ms:.2f} | {n} |" for name, k_ms, n in table[:top]]
        sections += ["", f"## {mode}: where the GPU waits for the host", "",
                     f"{idle['idle']:.1f} ms per step idle, {idle['busy']:.1f} ms busy ({idle['steps']} steps, each entered with the "
                     "GPU idle, modules labelled: the labels add host time). Each wait (from the step's start to its first "
                     "kernel, and each gap of 2 µs or more between kernels) goes to what the host was running when it launched the "
                     "kernel that ended it: the innermost module of the forward, the autograd node of the backward, the optimiser.",
                     "", "| host was in | idle ms / step | waits / step |", "|---|---:|---:|"]
        sections += [f"| `{context[:90]}` | {i_ms:.2f} | {n} |" for context, i_ms, n in waits[:TOP]]
        if mode == "eager":
            sections += host_sections(step, batch)
        print(f"{mode}: wall {ms:.1f} ms, kernels {total:.1f} ms, {launches} launches", flush=True)
        release_graphs(step.task)
    return lines + sections


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(p)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=TOP, help=f"kernels listed per mode, largest first (default {TOP})")
    args = p.parse_args(argv)
    if args.top < 1:
        raise SystemExit(f"error: --top must be at least 1, got {args.top}")
    if not torch.cuda.is_available():
        raise SystemExit("error: step_profile needs a GPU (CUDA is not available)")
    if args.model not in segresmamba.list_models():
        raise SystemExit(f"error: unknown model {args.model!r}; known models: {', '.join(segresmamba.list_models())}")
    lines = profile(args.model, args.config, args.precision, args.modes, args.steps, args.warmup, args.recipe, args.fast_norms,
                    args.channels_last, args.top)
    write_step_report(args, "step_profile", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
