"""What the paper protocol on real data costs in GPU hours, from the step and inference times we measured.

The paper trains every model 5 folds x 200 epochs with validation every epoch (Das et al., MIDL 2025,
App. A/B; its Table 6 gives 267.83 s per BraTS epoch for SegResMamba on an A100). This estimate takes our
measured figures from ``results/efficiency/<card>/<config>.csv`` (one training step = one patch at batch 1;
one validation case = sliding-window inference over a typical whole volume) and multiplies::

    train hours = folds x epochs x training cases per fold x step time
    val hours   = folds x epochs x validation cases per fold x whole-volume inference time

The step time is the mean of steps run back to back (``step_ms_pipelined_<precision>``), as a fit runs them,
where the row has it, and the median of steps synchronised one by one (``step_ms_<precision>``) in older rows;
the ``step_timing`` column and the table say which. The two agree for a GPU-bound step; for a host-bound one the
synchronised figure is the higher.

Data loading and augmentation are not in either figure (the profiler feeds tensors already on the GPU), so
a real run costs more wherever the loader cannot keep up; the estimate is a floor for the GPU's own work.

    python -m segresmamba.bench.gpu_hours results/efficiency/nvidia-h200 [--precision bf16] [--folds 5] [--epochs 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from segresmamba.bench.efficiency import PROFILED_DATASETS
from segresmamba.bench.paper import PAPER_GPU_TDP_KW, paper_value
from segresmamba.bench.runs import runs_text
from segresmamba.data.spec import get_dataset_spec

__all__ = ["estimate", "to_markdown"]


def estimate(efficiency_csv: Path, precision: str = "bf16", folds: int = 5, epochs: int = 200) -> pd.DataFrame:
    """One row per model of the table: training, validation and total GPU hours for the whole protocol."""
    config = efficiency_csv.stem
    if config not in PROFILED_DATASETS:
        raise ValueError(f"{efficiency_csv}: unknown config {config!r}; expected one of {sorted(PROFILED_DATASETS)}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if folds < 2 or epochs < 1:
        raise ValueError(f"need folds >= 2 and epochs >= 1, got folds={folds}, epochs={epochs}")
    table = pd.read_csv(efficiency_csv)
    step_col, volume_col = f"step_ms_{precision}", f"infer_volume_s_{precision}"
    missing = [c for c in (step_col, volume_col, "model", "device", "git_sha") if c not in table]
    if missing:
        raise ValueError(f"{efficiency_csv}: columns {missing} missing; was it written by segresmamba.bench.efficiency?")
    n_train, n_val = get_dataset_spec(config).split(folds)
    rows = []
    pipelined_col = f"step_ms_pipelined_{precision}"
    for r in table.itertuples():
        pipelined = pd.to_numeric(getattr(r, pipelined_col, None), errors="coerce")
        timing = "back to back" if pd.notna(pipelined) else "synchronised"
        step_ms = pipelined if pd.notna(pipelined) else pd.to_numeric(getattr(r, step_col), errors="coerce")
        step_s, volume_s = step_ms / 1000, pd.to_numeric(getattr(r, volume_col), errors="coerce")
        if pd.isna(step_s) or pd.isna(volume_s):
            continue  # not measured on this device (e.g. CPU rows)
        train_h = folds * epochs * n_train * step_s / 3600
        val_h = folds * epochs * n_val * volume_s / 3600
        paper_epoch_s = paper_value(config, r.model, "epoch_time")
        rows.append({
            "config": config, "model": r.model, "precision": precision, "step_timing": timing, "folds": folds, "epochs": epochs,
            "train_cases": n_train, "val_cases": n_val,
            "epoch_s": n_train * step_s + n_val * volume_s,
            "train_gpu_h": train_h, "val_gpu_h": val_h, "total_gpu_h": train_h + val_h,
            "energy_kwh_at_tdp": None,  # filled below
            "paper_epoch_s": paper_epoch_s,
            "paper_5fold_h": paper_epoch_s * epochs * folds / 3600 if paper_epoch_s else None,
            "device": r.device, "git_sha": r.git_sha, "data": getattr(r, "data", None),
        })
    out = pd.DataFrame(rows)
    if len(out):
        out["energy_kwh_at_tdp"] = out.total_gpu_h * _tdp_kw(str(out.device.iloc[0]))
    return out.sort_values("total_gpu_h").reset_index(drop=True)


def _tdp_kw(device: str) -> float:
    # board power of the card the times came from; the paper's calculator uses the A100 PCIe's 250 W
    for name, kw in (("H200", 0.70), ("H100", 0.70), ("A100", PAPER_GPU_TDP_KW)):
        if name in device:
            return kw
    return float("nan")


def to_markdown(df: pd.DataFrame) -> str:
    first = df.iloc[0]
    spec = get_dataset_spec(first.config)
    lines = [
        f"### {spec.title} ({spec.shape_text()}): {first.folds} folds x {first.epochs} epochs, "
        f"{first.train_cases} training + {first.val_cases} validation cases per fold, validation every epoch",
        "",
        f"From `{first.precision}` step and whole-volume times measured on {first.device} ({runs_text(df)}) "
        f"with {first.data or 'unrecorded inputs'}; data loading not included. Step timing: back to back = the mean "
        "of steps run as a fit runs them; synchronised = the median of steps timed one by one (rows measured before "
        "the profiler recorded the former).",
        "",
        "| model | step timing | epoch (s) | train GPU h | validation GPU h | total GPU h | kWh at board power | paper epoch (s, A100) | paper 5-fold h |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in df.itertuples():
        paper = f"{r.paper_epoch_s:.0f} | {r.paper_5fold_h:.1f}" if pd.notna(r.paper_epoch_s) else " | "
        lines.append(f"| {r.model} | {r.step_timing} | {r.epoch_s:.1f} | {r.train_gpu_h:.1f} | {r.val_gpu_h:.1f} | "
                     f"{r.total_gpu_h:.1f} | {r.energy_kwh_at_tdp:.1f} | {paper} |")
    lines.append(f"| **all {len(df)} models** | | | | | **{df.total_gpu_h.sum():.1f}** | {df.energy_kwh_at_tdp.sum():.1f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("efficiency_dir", type=Path, help="folder with <config>.csv from segresmamba.bench.efficiency")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--out", type=Path, default=None, help="where gpu_hours.{csv,md} go (default: efficiency_dir)")
    args = p.parse_args(argv)
    csvs = [args.efficiency_dir / f"{c}.csv" for c in PROFILED_DATASETS if (args.efficiency_dir / f"{c}.csv").is_file()]
    if not csvs:
        raise SystemExit(f"error: no {'/'.join(PROFILED_DATASETS)}.csv in {args.efficiency_dir} (run make bench-efficiency first)")
    tables = [estimate(c, args.precision, args.folds, args.epochs) for c in csvs]
    tables = [t for t in tables if len(t)]
    if not tables:
        raise SystemExit(f"error: {args.efficiency_dir} has no GPU-measured rows (CPU tables hold no step times)")
    out = args.out or args.efficiency_dir
    out.mkdir(parents=True, exist_ok=True)
    pd.concat(tables).to_csv(out / "gpu_hours.csv", index=False)
    text = ("# GPU hours of the paper protocol, estimated from measured step times\n\n"
            "Estimate = folds x epochs x (training cases x step time + validation cases x whole-volume inference "
            "time), batch 1; see `src/segresmamba/bench/gpu_hours.py`. kWh at board power is an upper bound for the GPU alone.\n\n")
    text += "\n".join(to_markdown(t) for t in tables)
    (out / "gpu_hours.md").write_text(text)
    print(f"wrote {out / 'gpu_hours.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
