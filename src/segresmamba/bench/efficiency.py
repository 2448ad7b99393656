"""Efficiency profiler: parameters, MACs, peak training memory, step time and inference time.

For every registered model at the paper's configurations (BTCV 1->14 at 128^3, BraTS 4->3 at 128^3,
Spleen 1->2 at 96^3, batch 1)::

    python -m segresmamba.bench.efficiency                       # all models, all configs, this machine's device
    python -m segresmamba.bench.efficiency --configs brats --models segresmamba swinunetr
    python -m segresmamba.bench.efficiency --gpus 0,1            # one model per GPU at a time

Measured (nnU-Net benchmarking practice: synthetic tensors already on the device, so no data loading;
warm-up steps first; CUDA synchronised):

- MACs: fvcore, one multiply-add = 1, plus the selective-scan handle (``segresmamba.profiling.macs``);
  the uncounted (elementwise) ops are listed in the row; a count with an uncounted scan/matmul/conv fails.
- training step (fwd + bwd + Adam step) for fp32 and bf16-mixed (autocast, fp32 weights): peak
  ``torch.cuda.max_memory_allocated`` after a reset, peak reserved, median step time by CUDA events;
- inference: one patch (eval, no_grad) median time, and one whole volume by sliding window
  (ROI = patch, overlap 0.5).

On a machine without a GPU the GPU columns are "not measured" (empty), never zero; a CPU forward time
for one patch is recorded instead. Tables go to ``results/efficiency/<device>/<config>.csv|.md`` with the
paper's figures (Tables 1-3, 7, 8) in adjacent columns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import segresmamba
from segresmamba.bench.runs import runs_text
from segresmamba.bench.paper import paper_figures
from segresmamba.profiling import count_macs
from segresmamba.ssm import TriOrientedMamba
from segresmamba.ssm.cuda_graphs import graph_tom_layers, release_tom_graphs
from segresmamba.ssm.scan import auto_choices, resolve_backend
from segresmamba.provenance import device_name, git_sha, versions

RESULTS = Path(__file__).resolve().parents[3] / "results" / "efficiency"
GIB = 1024**3
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class BenchConfig:
    """A paper configuration: channels, patch, and a whole-volume size for sliding-window timing."""

    name: str
    in_channels: int
    out_channels: int
    patch: tuple[int, int, int]
    volume: tuple[int, int, int]
    multilabel: bool


CONFIGS = {
    # volume: BraTS 2021 images are 240 x 240 x 155 at 1 mm; BTCV and Spleen CT after resampling to
    # 1.5 x 1.5 x 2 mm are roughly 256 x 256 x 128 and 256 x 256 x 96 (typical, not fixed)
    "btcv": BenchConfig("btcv", 1, 14, (128, 128, 128), (256, 256, 128), multilabel=False),
    "brats": BenchConfig("brats", 4, 3, (128, 128, 128), (240, 240, 155), multilabel=True),
    "spleen": BenchConfig("spleen", 1, 2, (96, 96, 96), (256, 256, 96), multilabel=False),
}
PRECISIONS = ("fp32", "bf16")


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _loss_fn(cfg: BenchConfig):
    from monai.losses import DiceLoss

    return DiceLoss(sigmoid=True) if cfg.multilabel else DiceLoss(softmax=True, to_onehot_y=True)


def _target(cfg: BenchConfig, shape, device) -> torch.Tensor:
    if cfg.multilabel:
        return (torch.rand(1, cfg.out_channels, *shape, device=device) > 0.5).float()
    return torch.randint(0, cfg.out_channels, (1, 1, *shape), device=device).float()


def _main_output(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def train_step(model, cfg: BenchConfig, precision: str):
    """``(step, x, autocast dtype)``: one fwd + bwd + Adam step of ``model`` on fixed synthetic tensors of
    batch 1 (x is the input it trains on), as every profiler here measures it."""
    device = torch.device("cuda")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    loss_fn = _loss_fn(cfg)
    x = torch.randn(1, cfg.in_channels, *cfg.patch, device=device)
    y = _target(cfg, cfg.patch, device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(_main_output(model(x)).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, x, dtype


def cuda_train_step(model, cfg: BenchConfig, precision: str, steps: int, warmup: int, cuda_graphs: bool = False) -> dict:
    """Peak memory (GiB) and median step time (ms) of fwd + bwd + Adam step, batch 1.

    ``cuda_graphs``: the small ToM layers replay CUDA graphs (:func:`segresmamba.ssm.cuda_graphs.graph_tom_layers`),
    captured for this precision before the warm-up; their pool counts in the peak."""
    step, x, dtype = train_step(model, cfg, precision)
    graphed = []
    if cuda_graphs:
        release_tom_graphs(model)  # those of another precision
        graphed = graph_tom_layers(model, x, dtype)
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            # steady state only: warm-ups hold cuDNN autotuning and the scan dispatch's one-off
            # measurement of its backends (copies of the scan inputs), which training pays once
            torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    result = {
        f"train_peak_gib_{precision}": torch.cuda.max_memory_allocated() / GIB,
        f"train_reserved_gib_{precision}": torch.cuda.max_memory_reserved() / GIB,
        f"step_ms_{precision}": statistics.median(times),
    }
    if cuda_graphs:
        result["cuda_graph_layers"] = len(graphed)
    return result


def cuda_inference(model, cfg: BenchConfig, precision: str, repeats: int, warmup: int) -> dict:
    from monai.inferers import sliding_window_inference

    device = torch.device("cuda")
    model.eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    x = torch.randn(1, cfg.in_channels, *cfg.patch, device=device)
    times = []
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
        volume = torch.randn(1, cfg.in_channels, *cfg.volume, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sliding_window_inference(volume, cfg.patch, 1, model, overlap=0.5)
        torch.cuda.synchronize()
        vol_s = time.perf_counter() - t0
    return {f"infer_patch_ms_{precision}": statistics.median(times), f"infer_volume_s_{precision}": vol_s}


def cpu_inference(model, cfg: BenchConfig) -> dict:
    model.eval()
    x = torch.randn(1, cfg.in_channels, *cfg.patch)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(x)
    return {"cpu_infer_patch_s": time.perf_counter() - t0}


def profile_one(model_name: str, cfg: BenchConfig, args) -> dict:
    """One row: every measurement of one model at one config; failures become an ``error`` field."""
    row: dict = {"model": model_name, "config": cfg.name}
    on_gpu = torch.cuda.is_available() and not args.cpu
    # as in training (configs/trainer/gpu.yaml: benchmark: true); without it bf16 depthwise 3D convs
    # (MedNeXt, 3D UX-Net) measured slower than fp32
    if on_gpu:
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        row["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    try:
        model = segresmamba.create_model(model_name, cfg.in_channels, cfg.out_channels, cfg.patch)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        device = torch.device("cuda" if on_gpu else "cpu")
        model.to(device)
        has_scan = any(isinstance(m, TriOrientedMamba) for m in model.modules())
        if has_scan:
            row["scan_backend"] = resolve_backend("auto", device)
            auto_choices(reset=True)
        if not args.skip_macs:
            macs = count_macs(model, torch.zeros(1, cfg.in_channels, *cfg.patch, device=device))
            row["gmacs"] = macs.gmacs
            row["scan_gmacs"] = sum(v for k, v in macs.by_operator.items() if "Scan" in k) / 1e9
            row["uncounted_ops"] = macs.uncounted_text()
        if on_gpu:
            for precision in args.precisions:
                try:
                    row.update(cuda_train_step(model, cfg, precision, args.steps, args.warmup, args.cuda_graphs))
                    row.update(cuda_inference(model, cfg, precision, args.steps, args.warmup))
                except torch.cuda.OutOfMemoryError:
                    row[f"error_{precision}"] = "CUDA out of memory"
                finally:
                    torch.cuda.empty_cache()
            if has_scan and auto_choices():
                # what ``auto`` measured fastest at this model's scan sizes ("triton+mamba_ssm" when it varies)
                row["scan_backend"] = "+".join(sorted({c["backend"] for c in auto_choices().values()}))
                # every signature's choice and the times behind it (JSON), for reading a step time back
                row["scan_auto_choices"] = json.dumps(auto_choices(), sort_keys=True)
        else:
            for precision in args.precisions:
                for key in ("train_peak_gib", "train_reserved_gib", "step_ms", "infer_patch_ms", "infer_volume_s"):
                    row[f"{key}_{precision}"] = NOT_MEASURED
            if not args.skip_cpu_times:
                row.update(cpu_inference(model, cfg))
    except Exception as err:  # a failing model becomes a row, the others go on
        row["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    return row


def _paper_columns(cfg: str) -> pd.DataFrame:
    figs = paper_figures()
    figs = figs[figs.dataset == cfg]
    wide = figs.pivot_table(index="model", columns="metric", values="value", aggfunc="first")
    rename = {"macs": "paper_macs_g", "train_memory": "paper_train_mem_gb", "inference_time": "paper_infer_s"}
    wide = wide[[c for c in rename if c in wide.columns]].rename(columns=rename)
    table7 = pd.read_csv(Path(__file__).resolve().parents[3] / "results/paper/table7_params_flops.csv")
    if cfg == "btcv":
        t7 = table7.set_index(table7.columns[0])
        params_col = next(c for c in t7.columns if "param" in c.lower())
        flops_col = next(c for c in t7.columns if "flop" in c.lower())
        wide = wide.join(t7[[params_col, flops_col]].rename(columns={params_col: "paper_params_m", flops_col: "paper_flops_g"}), how="outer")
    return wide.reset_index().rename(columns={"index": "model"})


def write_tables(rows: list[dict], out_dir: Path, meta: dict, configs: dict[str, BenchConfig] = CONFIGS) -> list[Path]:
    """``<out>/<device>/<config>.csv`` and ``.md``, with the paper's columns and provenance."""
    written = []
    df = pd.DataFrame(rows)
    for cfg_name, part in df.groupby("config"):
        part = part.drop(columns="config").merge(_paper_columns(cfg_name), on="model", how="left")
        for key, value in meta.items():
            part[key] = value
        dest = out_dir / card_slug(meta["device"])
        dest.mkdir(parents=True, exist_ok=True)
        csv = dest / f"{cfg_name}.csv"
        if csv.exists():  # a later invocation adds or replaces its models' rows, keeps the others
            kept = pd.read_csv(csv)
            part = pd.concat([kept[~kept.model.isin(part.model)], part], ignore_index=True)
        part.to_csv(csv, index=False, float_format="%.4g")
        cfg = configs[cfg_name]
        shown = [c for c in part.columns if c not in meta and c not in ("uncounted_ops", "scan_auto_choices")]
        md = [
            f"# Efficiency, {cfg_name}: {cfg.in_channels} -> {cfg.out_channels} channels, patch {'x'.join(map(str, cfg.patch))}, batch 1",
            "",
            f"Device: {meta['device']} · torch {meta['torch']} · CUDA {meta['cuda']} · MONAI {meta['monai']} · {runs_text(part)}",
            "",
            "Ours: MACs by fvcore (1 multiply-add = 1) plus 4.5 MACs per (token, channel, state) per selective scan; "
            "train = fwd + bwd + Adam step on synthetic tensors (no data loading); peak = max_memory_allocated; "
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
        written += [csv, dest / f"{cfg_name}.md"]
    return written


def _run_workers(jobs: list[tuple[str, str]], gpus: list[str], argv: list[str], out_dir: Path) -> list[dict]:
    """One subprocess per GPU, each taking every len(gpus)-th job; rows come back as JSON lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, gpu in enumerate(gpus):
        share = jobs[i :: len(gpus)]
        if not share:
            continue
        part = out_dir / f".rows-{i}.jsonl"
        part.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "segresmamba.bench.efficiency", *argv, "--worker-jobs", json.dumps(share), "--worker-out", str(part)]
        procs.append((subprocess.Popen(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}), part, gpu))
    rows, failed = [], []
    for proc, part, gpu in procs:
        if proc.wait() != 0:
            failed.append(f"GPU {gpu} (exit {proc.returncode})")
        if part.exists():
            rows += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
            part.unlink()
    if failed:  # keep what the others measured; say which worker stopped
        print(f"warning: profiler worker(s) failed: {', '.join(failed)}; their remaining models have no row", file=sys.stderr)
    if not rows:
        raise SystemExit(f"error: no profiler worker produced a row ({', '.join(failed) or 'no jobs'})")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--models", nargs="+", default=None, help="registry names (default: all)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--steps", type=int, default=6, help="measured steps after warm-up")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread models over (default: the current one)")
    p.add_argument("--cpu", action="store_true", help="profile on the CPU even if a GPU exists")
    p.add_argument("--patch", type=int, default=None, help="override every config's patch side (volume = 2 x patch); for quick CPU checks")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave cudnn.benchmark off (the training configs turn it on; the H200 tables of git bb16966 had it off)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the small ToM layers replay CUDA graphs in the training step (write to another --out: rows are keyed by model)")
    p.add_argument("--skip-macs", action="store_true")
    p.add_argument("--skip-cpu-times", action="store_true")
    p.add_argument("--worker-jobs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    known = segresmamba.list_models()
    args.models = args.models or known
    unknown = [m for m in args.models if m not in known]
    if unknown:
        p.error(f"unknown model(s) {unknown}; known: {', '.join(known)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.cuda_graphs and (args.cpu or not torch.cuda.is_available()):
        p.error("--cuda-graphs needs a GPU (CUDA graphs do not exist on a CPU)")
    return args


def main(argv: list[str] | None = None) -> list[Path]:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    configs = CONFIGS if not args.patch else {
        name: BenchConfig(name, c.in_channels, c.out_channels, (args.patch,) * 3, (2 * args.patch,) * 3, c.multilabel)
        for name, c in CONFIGS.items()
    }
    if args.worker_jobs:  # a worker of a multi-GPU run
        with open(args.worker_out, "a") as fh:
            for model_name, cfg_name in json.loads(args.worker_jobs):
                print(f"[GPU {os.environ.get('CUDA_VISIBLE_DEVICES', '?')}] {model_name} @ {cfg_name}", flush=True)
                fh.write(json.dumps(profile_one(model_name, configs[cfg_name], args)) + "\n")
                fh.flush()
        return []
    if args.gpus and not torch.cuda.is_available():
        raise SystemExit("error: --gpus given but CUDA is not available")
    jobs = [(m, c) for c in args.configs for m in args.models]
    if args.gpus and len(args.gpus.split(",")) > 1:
        passthrough = [a for a in raw if not a.startswith("--gpus") and a != args.gpus]
        rows = _run_workers(jobs, args.gpus.split(","), passthrough, args.out)
    else:
        rows = []
        for i, (model_name, cfg_name) in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {model_name} @ {cfg_name}", flush=True)
            rows.append(profile_one(model_name, configs[cfg_name], args))
    on_gpu = torch.cuda.is_available() and not args.cpu
    ver = versions()
    meta = {
        "device": device_name("cuda" if on_gpu else "cpu"),
        "torch": ver["torch"],
        "cuda": ver["cuda"],
        "monai": ver.get("monai", "?"),
        "git_sha": git_sha(),
        "data": "synthetic tensors",
    }
    if args.patch:
        meta["note"] = f"patch overridden to {args.patch}^3 (not the paper configuration)"
    written = write_tables(rows, args.out, meta, configs)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
