"""What bounds a whole-model training step on the GPU: kernel time against wall time, per step.

A step whose wall time is well above the sum of its GPU kernels is bound by the host (kernel launches and
Python), not by the GPU; CUDA graphs then help and faster kernels do not. One run, one device, each mode
after the other on the same model and batch (synthetic tensors, batch 1). The step is the suite's
(:mod:`segresmamba.bench.step`): ``SegmentationTask.training_step`` of the model as ``configs/model/<model>.yaml``
configures it, with the recipe's loss, backward and optimiser step:

    python -m perf.step_profile --model segresmamba --config brats --out results/perf

writes ``step_profile_<model>_<config>.md``: per mode (``eager``; ``cuda_graphs``: the small ToM layers
replaying CUDA graphs, :mod:`segresmamba.ssm.cuda_graphs`), the median wall time of a step, the GPU kernel
time and launches per step (torch.profiler), and the largest kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import segresmamba
from perf.scan_bench import kernel_breakdown
from segresmamba.bench.efficiency import PROFILED_DATASETS
from segresmamba.bench.step import TrainingStep, build_task, synthetic_batch
from segresmamba.data.spec import get_dataset_spec
from segresmamba.provenance import provenance
from segresmamba.ssm.cuda_graphs import graph_tom_layers, release_tom_graphs

MODES = ("eager", "cuda_graphs")
TOP = 15


def wall_ms(step, batch: dict, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile(model_name: str, config: str, precision: str, modes: list[str], steps: int, warmup: int, recipe: str = "paper") -> list[str]:
    spec = get_dataset_spec(config)
    torch.backends.cudnn.benchmark = True  # as the training configs
    torch.manual_seed(0)
    device = torch.device("cuda")
    step = TrainingStep(build_task(model_name, spec, recipe=recipe), precision, device)
    batch = synthetic_batch(spec, spec.patch, device)
    model, x, dtype = step.task.net, batch["image"], step.dtype
    prov = provenance(device, precision)
    lines = [f"# Training step of {model_name}, {config} {'x'.join(map(str, spec.patch))} b1 {precision}: GPU kernels against wall time", "",
             f"{prov['device']} · git {prov['git_sha']} · torch {prov['versions'].get('torch')} · triton {prov['versions'].get('triton')} · "
             f"synthetic tensors, the suite's training step (recipe {recipe}: task loss, backward, optimiser step), "
             f"`cudnn.benchmark` on. Wall: median of {steps} steps after {warmup} warm-ups "
             "(CUDA synchronised around each). Kernels: torch.profiler, mean of 3 steps. Names are cut at 90 characters.", "",
             "| mode | ToM layers in CUDA graphs | wall ms / step | GPU kernel ms / step | kernel share of wall | launches / step |",
             "|---|---:|---:|---:|---:|---:|"]
    sections = []
    for mode in modes:
        graphed = graph_tom_layers(model, x, dtype) if mode == "cuda_graphs" else []
        for _ in range(warmup):
            step(batch)
        ms = wall_ms(step, batch, steps)
        table, total = kernel_breakdown(lambda: step(batch), iters=3)
        launches = sum(r[2] for r in table)
        lines.append(f"| {mode} | {len(graphed)} | {ms:.1f} | {total:.1f} | {total / ms:.0%} | {launches} |")
        sections += ["", f"## {mode}: largest kernels", "", "| kernel | ms / step | launches |", "|---|---:|---:|"]
        sections += [f"| `{name[:90]}` | {k_ms:.2f} | {n} |" for name, k_ms, n in table[:TOP]]
        print(f"{mode}: wall {ms:.1f} ms, kernels {total:.1f} ms, {launches} launches", flush=True)
        release_tom_graphs(model)
    return lines + sections


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="segresmamba")
    p.add_argument("--config", default="brats", choices=list(PROFILED_DATASETS), help="dataset whose paper configuration is used")
    p.add_argument("--recipe", default="paper", help="training recipe whose loss and optimiser the step uses")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/perf"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: step_profile needs a GPU (CUDA is not available)")
    if args.model not in segresmamba.list_models():
        raise SystemExit(f"error: unknown model {args.model!r}; known models: {', '.join(segresmamba.list_models())}")
    lines = profile(args.model, args.config, args.precision, args.modes, args.steps, args.warmup, args.recipe)
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"step_profile_{args.model}_{args.config}.md"
    dest.write_text("\n".join(lines) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
