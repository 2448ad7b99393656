"""Efficiency profiler: parameters, MACs, peak training memory, step time and inference time.

For every registered model at the paper's configurations of the benchmark datasets
(:mod:`segresmamba.data.spec`: BTCV 1->14 at 128^3, BraTS 4->3 at 128^3, Spleen 1->2 at 96^3, batch 1)::

    python -m segresmamba.bench.efficiency                       # all models, all configs, this machine's device
    python -m segresmamba.bench.efficiency --configs brats --models segresmamba swinunetr
    python -m segresmamba.bench.efficiency --gpus 0,1            # one model per GPU at a time
    python -m segresmamba.bench.efficiency --configs brats --data-config configs/data/brats_phantom.yaml

or from Python: ``profile_model("segresmamba", "brats")`` (one row) and ``profile(models, datasets, out=...)``
(tables).

The step timed is the suite's training step (:mod:`segresmamba.bench.step`): ``SegmentationTask.training_step``
of the model as ``configs/model/<model>.yaml`` configures it, with the recipe's loss (deep supervision
included), backward and optimiser step. As nnU-Net benchmarks its trainers, it is measured twice: on one
fixed batch of synthetic tensors already on the device (``step_ms_<precision>``: the step alone, CUDA
synchronised, warm-up steps first; ``step_ms_pipelined_<precision>``: the same steps back to back, as a fit runs
them) and, when ``--data-config`` names a data config, on batches of that data
module's training loader (``step_ms_loaded_<precision>``: loading, augmentation and the host-to-device copy
included).

- MACs: fvcore, one multiply-add = 1, plus the selective-scan handle (``segresmamba.profiling.macs``);
  the uncounted (elementwise) ops are listed in the row; a count with an uncounted scan/matmul/conv fails.
- training step for fp32 and bf16-mixed (autocast, fp32 weights): peak ``torch.cuda.max_memory_allocated``
  after a reset, peak reserved, median step time (wall clock, synchronised around each step) with its spread
  (``step_ms_spread_<precision>``: slowest minus fastest) and mean step time of steps run back to back;
- inference: one patch (eval, no_grad) median time, and one whole volume by sliding window
  (ROI = patch, overlap 0.5).

On a machine without a GPU the GPU columns are "not measured" (empty), never zero; a CPU training step and
forward time for one patch are recorded instead. Tables go to ``<out>/<device>/<config>.csv|.md``
(default ``results/efficiency``) with the paper's figures (Tables 1-3, 7, 8) in adjacent columns.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch

import segresmamba
from segresmamba.bench.configs import instantiate_datamodule, stack_configs
from segresmamba.bench.paper import paper_columns
from segresmamba.bench.project import resolve
from segresmamba.bench.runs import runs_text
from segresmamba.bench.step import TrainingStep, build_task, loader_batches, synthetic_batch
from segresmamba.bench.workers import device_env, run_on_devices
from segresmamba.data.spec import DATASETS, DatasetSpec, get_dataset_spec
from segresmamba.profiling import count_macs
from segresmamba.profiling.host import host_costs
from segresmamba.provenance import device_name, git_sha, versions
from segresmamba.registry import check_patch
from segresmamba.ssm import TriOrientedMamba
from segresmamba.ssm.cuda_graphs import graph_tom_layers, release_tom_graphs
from segresmamba.ssm.scan import auto_choices, auto_failures, resolve_backend
from segresmamba.step_graphs import TrainingGraph

__all__ = ["charts", "profile_model", "profile", "write_tables", "card_slug", "time_steps", "release_graphs", "PROFILED_DATASETS"]

RESULTS = Path("results") / "efficiency"
GIB = 1024**3
NOT_MEASURED = "not measured"
PRECISIONS = ("fp32", "bf16")
PROFILED_DATASETS = ("brats", "btcv", "spleen")  # the configurations the paper measures (its section 3.1, Table 8)
# CUDA graphs in the timed step: none, the small ToM layers (segresmamba.ssm.cuda_graphs) or the whole
# forward + loss + backward (segresmamba.step_graphs)
GRAPH_MODES = ("none", "tom", "step")


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def at_patch(spec: DatasetSpec, patch: int | None) -> DatasetSpec:
    """``spec`` with its patch replaced by ``patch``^3 and its volume by twice that (quick CPU checks)."""
    return spec if patch is None else dataclasses.replace(spec, patch=(patch,) * 3, volume=(2 * patch,) * 3)


def time_steps(step, batches: Iterator[dict], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls ``step(next(batches))`` after ``warmup`` untimed ones; the
    batch is drawn inside the timed span (a loader's time counts). CUDA: wall time with the device
    synchronised around each step, and the peak memory statistics reset after the warm-up (steady state
    only: warm-ups hold cuDNN autotuning and the scan dispatch's one-off measurement of its backends)."""
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
            if i == warmup:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step(next(batches))
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def step_time_figures(times: Sequence[float], precision: str) -> dict:
    """The median of synchronised step times (ms) and their spread, the slowest minus the fastest: a step bound by
    the host moves by tens of milliseconds between steps of one process, so a median alone hides how far one
    row can be trusted."""
    return {f"step_ms_{precision}": statistics.median(times), f"step_ms_spread_{precision}": max(times) - min(times)}


def time_pipelined(step, batch: dict, steps: int) -> float:
    """Mean milliseconds per step of ``steps`` calls ``step(batch)`` back to back on CUDA, the device synchronised
    before the first and after the last only.

    The host then queues step i + 1 while the GPU runs step i, as in a fit (whose step timer and logging do not
    wait for the GPU within an epoch): a step bound by the host comes out below :func:`time_steps`' synchronised
    median, which also holds the GPU's work left after the host's last launch; a step bound by the GPU comes out the
    same."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(batch)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / steps


def is_graph_pool_segment(segment: dict, device: int) -> bool:
    """Whether a segment of the allocator's snapshot belongs to a private (CUDA-graph) memory pool on ``device``."""
    return tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0) and segment.get("device", 0) == device


def graph_pool_bytes(free_only: bool = True) -> int:
    """Bytes of the private (CUDA-graph) memory pools on the current device that no live tensor holds (with
    ``free_only=False``: their whole size).

    A replay allocates nothing, so ``max_memory_allocated`` during graphed steps counts the tensors that outlive
    a replay (static inputs, outputs, gradients) but not the activations and temporaries the replays write
    into the rest of their pool; that rest is added to the peak (an upper bound of what the replays use)."""
    return sum(
        seg["total_size"] - (seg["allocated_size"] if free_only else 0) for seg in torch.cuda.memory_snapshot()
        if is_graph_pool_segment(seg, torch.cuda.current_device())
    )


def release_graphs(task) -> None:
    """Drop a task's CUDA graphs (ToM layers and whole step) and their pools before the next measurement."""
    release_tom_graphs(task.net)
    task.step_graph = None
    gc.collect()  # the graphs and the task refer to each other
    torch.cuda.empty_cache()


def cuda_train_step(task, spec: DatasetSpec, precision: str, steps: int, warmup: int, *, graphs: str = "none", datamodule=None) -> dict:
    """Peak memory (GiB) and median time (ms) of the suite's training step of ``task`` at batch 1, on one
    fixed batch and, with a ``datamodule``, on its loader's batches.

    ``graphs``: ``tom``, the small ToM layers replay CUDA graphs (:func:`segresmamba.ssm.cuda_graphs.graph_tom_layers`);
    ``step``, the whole forward, loss and backward do (:class:`segresmamba.step_graphs.TrainingGraph`). Either
    is captured for this precision after one eager step (the eager rows' warm-up: cuDNN's autotuning, the
    optimiser's state) and before the timed warm-up. The peak is then the larger of the capture's (its eager
    warm-up included) and the steady state's, the latter measured from the end of the capture, with the free part of
    the graphs' memory pool added (:func:`graph_pool_bytes`); reserved is the largest over both. With graphs the
    row also records the capture's peak and the graphs' pools' whole size apart, to show which sets the peak."""
    device = torch.device("cuda")
    step = TrainingStep(task, precision, device)
    batch = synthetic_batch(spec, spec.patch, device)
    graphed = []
    try:
        if graphs != "none":
            # one eager step first, as the eager rows' warm-up: cuDNN's benchmark tries its algorithms (with their
            # workspaces) there, and the optimiser's state exists, so that neither mode's peak counts the autotuning
            step(batch)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if graphs == "tom":
            graphed = graph_tom_layers(task.net, batch["image"], step.dtype)
        elif graphs == "step":
            task.step_graph = TrainingGraph(task, batch["image"], batch["label"], step.dtype)
        capture_peak = capture_reserved = 0
        if graphs != "none":
            # the capture's peak (its eager warm-up's activations) is over once the graphs exist; the steady state's
            # peak is taken from here on, or it would count those activations twice: as the warm-up's allocation and
            # again as the pool's free blocks the replays write them into
            capture_peak, capture_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        times = time_steps(step, itertools.repeat(batch), steps, warmup, device)
        steady_peak = torch.cuda.max_memory_allocated() + (graph_pool_bytes() if graphs != "none" else 0)
        result = {
            f"train_peak_gib_{precision}": max(capture_peak, steady_peak) / GIB,
            f"train_reserved_gib_{precision}": max(capture_reserved, torch.cuda.max_memory_reserved()) / GIB,
            **step_time_figures(times, precision),
            f"step_ms_pipelined_{precision}": time_pipelined(step, batch, steps),
        }
        if datamodule is not None:
            loaded = time_steps(step, loader_batches(datamodule, device), steps, warmup, device)
            result[f"step_ms_loaded_{precision}"] = statistics.median(loaded)
        if graphs != "none":
            result[f"train_capture_peak_gib_{precision}"] = capture_peak / GIB
            result[f"train_graph_pool_gib_{precision}"] = graph_pool_bytes(free_only=False) / GIB
        if graphs == "tom":
            result["cuda_graph_layers"] = len(graphed)
        return result
    finally:
        del step
        release_graphs(task)


def cuda_inference(net: torch.nn.Module, spec: DatasetSpec, precision: str, repeats: int, warmup: int) -> dict:
    from monai.inferers import sliding_window_inference

    device = torch.device("cuda")
    net.eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    x = torch.randn(1, spec.in_channels, *spec.patch, device=device)
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            net(x)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
        volume = torch.randn(1, spec.in_channels, *spec.volume, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sliding_window_inference(volume, spec.patch, 1, net, overlap=0.5)
        torch.cuda.synchronize()
        vol_s = time.perf_counter() - t0
    return {f"infer_patch_ms_{precision}": statistics.median(times), f"infer_volume_s_{precision}": vol_s}


def cpu_times(task, spec: DatasetSpec, datamodule=None) -> dict:
    """On a CPU: one training step of the suite (after one warm-up step; fp32), with a loader's batch too
    when a data module is given, and one patch's forward pass."""
    device = torch.device("cpu")
    step = TrainingStep(task, "fp32", device)
    out = {"cpu_step_s": time_steps(step, itertools.repeat(synthetic_batch(spec, spec.patch, device)), 1, 1, device)[0] / 1e3}
    if datamodule is not None:
        out["cpu_step_loaded_s"] = time_steps(step, loader_batches(datamodule, device), 1, 1, device)[0] / 1e3
    task.eval()
    x = torch.randn(1, spec.in_channels, *spec.patch)
    with torch.no_grad():
        t0 = time.perf_counter()
        task.net(x)
    out["cpu_infer_patch_s"] = time.perf_counter() - t0
    return out


def profile_model(
    model: str,
    dataset: str | DatasetSpec,
    *,
    precisions: Sequence[str] = PRECISIONS,
    steps: int = 6,
    warmup: int = 2,
    recipe: str = "paper",
    patch: int | None = None,
    data: dict | None = None,
    cpu: bool = False,
    graphs: str = "none",
    channels_last: bool = False,
    fast_norms: bool | str = False,
    cudnn_benchmark: bool = True,
    macs: bool = True,
    cpu_step: bool = True,
    inference: bool = True,
) -> dict:
    """One row: every measurement of ``model`` at ``dataset``'s paper configuration on this machine's device.

    Args:
        model: a registry name; its ``configs/model/<model>.yaml`` configures the net.
        dataset: a :mod:`segresmamba.data.spec` name or spec.
        precisions: ``fp32`` and/or ``bf16`` (GPU only).
        steps, warmup: timed steps after untimed warm-up steps.
        recipe: the training recipe whose loss and optimiser the step uses.
        patch: side of a cubic patch replacing the paper's (quick CPU checks; the volume becomes twice it).
        data: a ``data:`` block (``class_path``, ``init_args``) whose training loader feeds the second timing.
        cpu: profile on the CPU even when a GPU exists.
        graphs: CUDA graphs in the training step (GPU only): ``none``, ``tom`` (the small ToM layers) or
            ``step`` (the whole forward, loss and backward).
        channels_last: the task's ``channels_last`` setting (3D conv weights and the input in NDHWC layout).
        fast_norms: the task's ``fast_norms`` setting (GroupNorm / InstanceNorm by whole-tensor reductions; ``"group"``:
            GroupNorm only).
        cudnn_benchmark: as in training (``configs/trainer/gpu.yaml``); without it bf16 depthwise 3D convs
            (MedNeXt, 3D UX-Net) measured slower than fp32.
        macs, cpu_step: count MACs; on a CPU, time a training step and a forward pass.
        inference: on a GPU, time the patch forward and the whole-volume sliding window too.

    A failure (out of memory, a net that breaks) becomes an ``error`` field of the row; a patch the model
    cannot take raises ValueError before anything is built.
    """
    spec = at_patch(get_dataset_spec(dataset) if isinstance(dataset, str) else dataset, patch)
    check_patch(model, spec.patch)
    on_gpu = torch.cuda.is_available() and not cpu
    if graphs not in GRAPH_MODES:
        raise ValueError(f"graphs must be one of {GRAPH_MODES}, got {graphs!r}")
    if graphs != "none" and not on_gpu:
        raise ValueError(f"graphs={graphs!r} needs a GPU (CUDA graphs do not exist on a CPU)")
    row: dict = {"model": model, "config": spec.name, "recipe": recipe, "graphs": graphs, "channels_last": channels_last,
                 "fast_norms": fast_norms}
    if on_gpu:
        torch.backends.cudnn.benchmark = cudnn_benchmark
        row["cudnn_benchmark"] = cudnn_benchmark
    try:
        torch.manual_seed(0)
        task = build_task(model, spec, recipe=recipe, channels_last=channels_last, fast_norms=fast_norms)
        net = task.net
        row["params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
        device = torch.device("cuda" if on_gpu else "cpu")
        task.to(device)
        has_scan = any(isinstance(m, TriOrientedMamba) for m in net.modules())
        if has_scan:
            row["scan_backend"] = resolve_backend("auto", device)
            auto_choices(reset=True)
        if macs:
            counted = count_macs(net.eval(), torch.zeros(1, spec.in_channels, *spec.patch, device=device))
            row["gmacs"] = counted.gmacs
            row["scan_gmacs"] = sum(v for k, v in counted.by_operator.items() if "Scan" in k) / 1e9
            row["uncounted_ops"] = counted.uncounted_text()
        datamodule = instantiate_datamodule(data) if data else None
        if on_gpu:
            # this process's cost per call of a few kinds of op: a host-bound step is as fast as its host
            row.update({f"host_{kind}_us": us for kind, us in host_costs(device).items()})
            for precision in precisions:
                try:
                    row.update(cuda_train_step(task, spec, precision, steps, warmup, graphs=graphs, datamodule=datamodule))
                    if inference:
                        row.update(cuda_inference(net, spec, precision, steps, warmup))
                except torch.cuda.OutOfMemoryError:
                    row[f"error_{precision}"] = "CUDA out of memory"
                finally:
                    torch.cuda.empty_cache()
            if has_scan and auto_choices():
                # what ``auto`` measured fastest at this model's scan sizes ("triton+mamba_ssm" when it varies)
                row["scan_backend"] = "+".join(sorted({c["backend"] for c in auto_choices().values()}))
                # every signature's choice and the times behind it (JSON), for reading a step time back
                row["scan_auto_choices"] = json.dumps(auto_choices(), sort_keys=True)
            if has_scan and auto_failures():
                # a backend that failed while measured was left out: this row's times ran without it
                row["scan_auto_failures"] = "; ".join(auto_failures())
                print(f"warning: {model}: scan backends failed while auto measured them and were not used: "
                      f"{row['scan_auto_failures']}", file=sys.stderr)
            if has_scan and "triton" in str(row["scan_backend"]):
                import triton

                from segresmamba.ssm.triton.tuning import TUNING, mirrored_backward

                # launch settings, env overrides included, with the backward's formulation as this Triton resolves it
                settings = {**TUNING, "bwd_mirror": mirrored_backward(triton.__version__)}
                row["triton_scan_settings"] = json.dumps(settings, sort_keys=True)
        else:
            for precision in precisions:
                for key in ("train_peak_gib", "train_reserved_gib", "step_ms", "step_ms_spread", "step_ms_pipelined", "infer_patch_ms",
                            "infer_volume_s"):
                    row[f"{key}_{precision}"] = NOT_MEASURED
            if cpu_step:
                row.update(cpu_times(task, spec, datamodule))
    except Exception as err:  # a failing model becomes a row, the others go on
        row["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    return row


def write_tables(rows: list[dict], out_dir: Path, meta: dict, specs: dict[str, DatasetSpec] = DATASETS, *,
                 with_charts: bool = True) -> list[Path]:
    """``<out>/<device>/<config>.csv`` and ``.md``, with the paper's columns and provenance, and their
    :func:`charts` unless ``with_charts`` is False."""
    written = []
    df = pd.DataFrame(rows)
    for cfg_name, part in df.groupby("config"):
        part = part.drop(columns="config").merge(paper_columns(cfg_name), on="model", how="left")
        for key, value in meta.items():
            part[key] = value
        dest = out_dir / card_slug(meta["device"])
        dest.mkdir(parents=True, exist_ok=True)
        csv = dest / f"{cfg_name}.csv"
        if csv.exists():  # a later invocation adds or replaces its models' rows, keeps the others
            kept = pd.read_csv(csv)
            part = pd.concat([kept[~kept.model.isin(part.model)], part], ignore_index=True)
        part.to_csv(csv, index=False, float_format="%.4g")
        spec = specs[cfg_name]
        shown = [c for c in part.columns if c not in meta and c not in ("uncounted_ops", "scan_auto_choices", "triton_scan_settings")]
        md = [
            f"# Efficiency, {cfg_name}: {spec.in_channels} -> {spec.out_channels} channels, patch {'x'.join(map(str, spec.patch))}, batch 1",
            "",
            f"Device: {meta['device']} · torch {meta['torch']} · CUDA {meta['cuda']} · MONAI {meta['monai']} · {runs_text(part)}",
            "",
            "Ours: MACs by fvcore (1 multiply-add = 1) plus 4.5 MACs per (token, channel, state) per selective scan; "
            "train = the suite's training step (`SegmentationTask.training_step` of `configs/model/<model>.yaml` "
            "with the recipe's loss, backward and optimiser step) on one batch of synthetic tensors (`step_ms_*`: "
            "median of steps synchronised one by one; `step_ms_spread_*`: the slowest of them minus the fastest, when "
            "measured; `step_ms_pipelined_*`: mean of steps run back to back, as a fit runs them, when measured) and on a data loader's batches (`step_ms_loaded_*`, when measured); "
            "peak = max_memory_allocated; "
            "`host_*_us`: what one elementwise op, small GEMM, cuDNN conv3d and Triton launch cost that row's process on "
            "the host, in microseconds, when measured (`segresmamba.profiling.host`: a host-bound step is as fast as its host); "
            "bf16 = autocast with fp32 weights; empty GPU cells = not measured (no GPU). `paper_*` columns: "
            "Das et al. 2025 (A100 40GB), Tables 1-3 (MACs, inference s), 7 (params, FLOPs), 8 (training memory).",
            "",
            part[shown].to_markdown(index=False, floatfmt=".3g"),
            "",
            "Uncounted (elementwise) ops per model:",
            "",
        ]
        md += [f"- {r.model}: {r.uncounted_ops}" for r in part.itertuples() if isinstance(getattr(r, "uncounted_ops", None), str)]
        (dest / f"{cfg_name}.md").write_text("\n".join(md) + "\n")
        written += [csv, dest / f"{cfg_name}.md", *(charts(csv, dest) if with_charts else [])]
    return written


def charts(csv: Path, dest: Path) -> list[Path]:
    """The charts of an efficiency table beside it: MACs (``macs_<config>.png``) and peak training memory
    (``memory_<config>.png``), each drawn where the table holds such figures (a CPU table has no peaks)."""
    from segresmamba.bench.aggregate import plot_macs, plot_memory

    table = pd.read_csv(csv)

    def measured(*cols: str) -> bool:
        return any(pd.to_numeric(table[c], errors="coerce").notna().any() for c in cols if c in table)

    out = []
    if measured("gmacs"):
        out.append(plot_macs(csv, dest))
    if measured("train_peak_gib_fp32", "train_peak_gib_bf16"):
        out.append(plot_memory(csv, dest))
    return out


def _profile_in_subprocess(job: tuple[str, str], device: str | None, argv: list[str]) -> dict:
    """One (model, dataset) profiled in its own process on ``device`` (CUDA is set up once per process)."""
    model, dataset = job
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "segresmamba.bench.efficiency", *argv, "--worker-job", json.dumps(job), "--worker-out", str(dest)]
        proc = subprocess.run(cmd, env=device_env(device))
        if proc.returncode != 0 or not dest.is_file():
            return {"model": model, "config": dataset, "error": f"profiler process on device {device} ended with exit code {proc.returncode}"}
        return json.loads(dest.read_text())


def profile(
    models: Sequence[str],
    datasets: Sequence[str] = PROFILED_DATASETS,
    *,
    out: Path = RESULTS,
    gpus: Sequence[str] | None = None,
    worker_argv: list[str] | None = None,
    note: str | None = None,
    with_charts: bool = True,
    **options,
) -> list[Path]:
    """Profile every model at every dataset and write the tables (see :func:`write_tables`).

    Every (model, dataset) patch is checked first; ``gpus`` with several ids spreads the jobs over them, one
    process per job (:func:`segresmamba.bench.workers.run_on_devices`; ``worker_argv`` are the command-line
    options each process profiles with). ``options`` go to :func:`profile_model`; ``with_charts``: draw the
    tables' charts (:func:`charts`).
    """
    jobs = [(m, d) for d in datasets for m in models]
    bad = []
    for model, dataset in jobs:
        try:
            check_patch(model, at_patch(get_dataset_spec(dataset), options.get("patch")).patch)
        except ValueError as err:
            bad.append(f"{dataset}: {err}")
    if bad:
        raise ValueError("patch check failed before profiling:\n  " + "\n  ".join(bad))
    if gpus and len(gpus) > 1:
        rows = [row for _, row in run_on_devices(lambda job, gpu: _profile_in_subprocess(job, gpu, worker_argv or []), jobs, list(gpus))]
    else:
        rows = []
        for i, (model, dataset) in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {model} @ {dataset}", flush=True)
            rows.append(profile_model(model, dataset, **options))
    on_gpu = torch.cuda.is_available() and not options.get("cpu")
    ver = versions()
    meta = {
        "device": device_name("cuda" if on_gpu else "cpu"),
        "torch": ver["torch"],
        "cuda": ver["cuda"],
        "monai": ver.get("monai", "?"),
        "git_sha": git_sha(),
        "data": "synthetic tensors" + (f"; loader: {options['data']['class_path']}" if options.get("data") else ""),
    }
    if options.get("patch"):
        meta["note"] = f"patch overridden to {options['patch']}^3 (not the paper configuration)"
    if note:
        meta["note"] = note
    return write_tables(rows, out, meta, with_charts=with_charts)


def fast_norms_choice(text: str) -> str:
    """The value of ``--fast-norms NORMS``: only ``group`` (a bare ``--fast-norms`` switches every norm)."""
    if text != "group":
        raise argparse.ArgumentTypeError(f"the only value --fast-norms takes is 'group' (GroupNorm only), got {text!r}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(PROFILED_DATASETS), choices=sorted(DATASETS),
                   help="datasets of segresmamba.data.spec whose paper configuration is profiled")
    p.add_argument("--models", nargs="+", default=None, help="registry names (default: all)")
    p.add_argument("--recipe", default="paper", help="training recipe whose loss and optimiser the step uses")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--steps", type=int, default=6, help="measured steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS, help="tables go to <out>/<device>/ (default: results/efficiency)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread models over (default: the current one)")
    p.add_argument("--cpu", action="store_true", help="profile on the CPU even if a GPU exists")
    p.add_argument("--patch", type=int, default=None, help="override every config's patch side (volume = 2 x patch); for quick CPU checks")
    p.add_argument("--data-config", nargs="+", default=None,
                   help="data config(s) whose training loader the step is timed on too (step_ms_loaded_*), e.g. configs/data/brats_phantom.yaml")
    p.add_argument("--data-root", default=None, help="the data folder of --data-config (replaces its root)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave cudnn.benchmark off (the training configs turn it on; the H200 tables of git bb16966 had it off)")
    p.add_argument("--graphs", default="none", choices=GRAPH_MODES,
                   help="CUDA graphs in the training step: the small ToM layers (tom) or the whole forward, loss and "
                        "backward (step); GPU only (write to another --out: rows are keyed by model)")
    p.add_argument("--channels-last", action="store_true",
                   help="3D conv weights and the input in channels_last_3d (NDHWC) layout (the task's channels_last)")
    p.add_argument("--fast-norms", nargs="?", const=True, default=False, type=fast_norms_choice,
                   help="GroupNorm / InstanceNorm by whole-tensor reductions (the task's fast_norms); "
                        "`--fast-norms group`: GroupNorm only")
    p.add_argument("--skip-macs", action="store_true")
    p.add_argument("--skip-cpu-times", action="store_true")
    p.add_argument("--worker-job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = segresmamba.list_models()
    args.models = args.models or known
    unknown = [m for m in args.models if m not in known]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(known)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.graphs != "none" and (args.cpu or not torch.cuda.is_available()):
        p.error(f"--graphs {args.graphs} needs a GPU (CUDA graphs do not exist on a CPU)")
    if args.data_root and not args.data_config:
        p.error("--data-root needs --data-config")
    return args


def data_block(config_files: Sequence[str], *, root: str | None, spec: DatasetSpec, recipe: str) -> dict:
    """The ``data:`` block of stacked data configs, set to ``spec``'s patch, batch 1 and ``recipe``."""
    data = stack_configs([resolve(f) for f in config_files]).get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{' '.join(config_files)}: no `data:` block")
    init = dict(data.get("init_args") or {})
    init.update(patch_size=list(spec.patch), batch_size=1, recipe=recipe)
    if root:
        init["root"] = root
    elif isinstance(init.get("root"), str):
        init["root"] = str(resolve(init["root"]))
    return {"class_path": data.get("class_path"), "init_args": init}


def main(argv: list[str] | None = None) -> list[Path]:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    options = {
        "precisions": args.precisions, "steps": args.steps, "warmup": args.warmup, "recipe": args.recipe,
        "patch": args.patch, "cpu": args.cpu, "graphs": args.graphs,
        "channels_last": args.channels_last, "fast_norms": args.fast_norms,
        "cudnn_benchmark": not args.no_cudnn_benchmark, "macs": not args.skip_macs, "cpu_step": not args.skip_cpu_times,
    }
    if args.data_config:
        if len(args.configs) > 1:
            raise SystemExit("error: --data-config holds one dataset's data: profile one of --configs at a time")
        spec = at_patch(get_dataset_spec(args.configs[0]), args.patch)
        try:
            options["data"] = data_block(args.data_config, root=args.data_root, spec=spec, recipe=args.recipe)
            instantiate_datamodule(options["data"]).validate()  # bad data stops here, before any model is built
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: data check failed before profiling: {err}") from None
    if args.worker_job:  # one job of a multi-GPU run
        model, dataset = json.loads(args.worker_job)
        Path(args.worker_out).write_text(json.dumps(profile_model(model, dataset, **options)))
        return []
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    if gpus and not torch.cuda.is_available():
        raise SystemExit("error: --gpus given but CUDA is not available")
    passthrough = [a for a in raw if not a.startswith("--gpus") and a != args.gpus]
    try:
        written = profile(args.models, args.configs, out=args.out, gpus=gpus, worker_argv=passthrough, **options)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
