"""Whole-model training step, long format: ``results/perf/model_step.csv`` and ``.md``.

The figures are the efficiency profiler's (the suite's training step, :mod:`segresmamba.bench.step`: the
configured model's ``SegmentationTask.training_step`` with the recipe's loss, backward and optimiser step,
batch 1, synthetic tensors), one row per (model, precision, mode), so the models compare side by side with
the scan benchmarks; the eager rows also carry the profiler's sliding-window inference time of one whole
volume of the config. ``--measure`` takes them on this GPU in one run (one process, one card):

- ``eager``: every model, fp32 and bf16;
- ``tom``: the models with ToM layers again, their small ToM layers replaying CUDA graphs
  (:mod:`segresmamba.ssm.cuda_graphs`), bf16;
- ``step``: every model with its whole forward, loss and backward replaying CUDA graphs
  (:mod:`segresmamba.step_graphs`, the fastest mode), bf16;
- ``eager_cl`` and ``step_cl``: the same two with ``channels_last`` (NDHWC 3D conv layout), bf16;
- ``eager_fn`` and ``step_fn``: the same two with ``fast_norms`` (GroupNorm and InstanceNorm by whole-tensor
  reductions, :mod:`segresmamba.models.group_norm`), bf16;
- ``eager_gn``: eager with ``fast_norms="group"`` (GroupNorm only, the eager choice), bf16, the models with GroupNorm;
- ``step_cl_fn``: whole-step graphs with both ``channels_last`` and ``fast_norms``, bf16: in a graphed step cuDNN's
  NCDHW <-> NDHWC conversions are GPU time, not host time, and channels_last removes them.

The eager steps of the Mamba models are bound by the host's kernel launches (about 1,900 per SegResMamba step),
so their times move with whatever else runs on the host's CPUs: measure on an otherwise idle machine. The
graphed modes are bound by the GPU.

The profiler's own tables are kept under ``<out>/model_step_source/<mode>/``. ``--table`` reshapes existing
efficiency tables instead:

    python -m perf.model_step --measure
    python -m perf.model_step --table results/efficiency/nvidia-h200/brats.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from segresmamba.bench.project import project_root
from segresmamba.bench.runs import runs_text
from segresmamba.data.spec import get_dataset_spec

DEFAULT_MODELS = ("segresmamba", "segresmamba_notom", "swinunetr", "unetr", "nnunet", "segmamba")


MODES = ("eager", "tom", "step", "eager_cl", "step_cl", "eager_fn", "step_fn", "eager_gn", "step_cl_fn")


def _graphs_text(row) -> str:
    mode = getattr(row, "graphs", None)
    layers = pd.to_numeric(getattr(row, "cuda_graph_layers", None), errors="coerce")
    if mode == "step":
        return "whole step"
    return f"{int(layers)} ToM layers" if not pd.isna(layers) else "-"


def _layout_text(row) -> str:
    return "NDHWC" if str(getattr(row, "channels_last", False)).lower() == "true" else "NCDHW"


def _text(row, column: str) -> str:
    """A text column of a source row, ``-`` where the row has none (an empty cell, or a run before the column)."""
    value = getattr(row, column, None)
    return value if isinstance(value, str) else "-"


def _norms_text(row) -> str:
    setting = str(getattr(row, "fast_norms", False)).lower()
    return {"true": "whole-tensor", "group": "whole-tensor GroupNorm"}.get(setting, "torch")


def measure(models: tuple[str, ...], source: Path, modes: tuple[str, ...] = MODES) -> list[Path]:
    """Efficiency tables of ``models`` on this GPU (BraTS 128^3), one per mode (see the module docstring)."""
    import torch

    from segresmamba.bench.efficiency import profile
    from segresmamba.ssm import TriOrientedMamba

    if not torch.cuda.is_available():
        raise SystemExit("error: --measure needs a GPU (CUDA is not available); use --table to reshape existing tables")
    common = {"macs": False, "cpu_step": False}
    tables = []

    def run(mode: str, holding: type | None = None, **options) -> None:
        """Profile ``mode`` if chosen, for every model or, with ``holding``, those whose net has such a module."""
        if mode not in modes:
            return  # and no net is built to ask what it holds
        chosen = [m for m in models if holding is None or _holds(m, holding)]
        if chosen:
            written = profile(chosen, ["brats"], out=source / mode, with_charts=False, **common, **options)
            tables.append(next(p for p in written if p.suffix == ".csv"))

    run("eager")
    bf16 = {"precisions": ["bf16"], "inference": False}
    run("tom", TriOrientedMamba, graphs="tom", **bf16)
    run("step", graphs="step", **bf16)
    run("eager_cl", channels_last=True, **bf16)
    run("step_cl", graphs="step", channels_last=True, **bf16)
    run("eager_fn", fast_norms=True, **bf16)
    run("step_fn", graphs="step", fast_norms=True, **bf16)
    run("eager_gn", torch.nn.GroupNorm, fast_norms="group", **bf16)
    run("step_cl_fn", graphs="step", channels_last=True, fast_norms=True, **bf16)
    return tables


def _holds(model: str, module_class: type) -> bool:
    """Whether ``model``'s BraTS net has a module of exactly ``module_class``."""
    from segresmamba.bench.step import build_task

    return any(type(m) is module_class for m in build_task(model, get_dataset_spec("brats")).net.modules())


def reshape(table: pd.DataFrame, config: str, models: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for r in table[table.model.isin(models)].itertuples():
        for precision in ("bf16", "fp32"):
            peak, step = getattr(r, f"train_peak_gib_{precision}", None), getattr(r, f"step_ms_{precision}", None)
            peak = pd.to_numeric(peak, errors="coerce")
            # reserved is shown where the peak was validly measured (an empty peak marks a run whose memory was not)
            reserved = pd.to_numeric(getattr(r, f"train_reserved_gib_{precision}", None), errors="coerce") if pd.notna(peak) else float("nan")
            volume = getattr(r, f"infer_volume_s_{precision}", None)
            rows.append({
                "device": r.device, "model": r.model, "config": config, "precision": precision,
                "peak_gib": peak, "reserved_gib": reserved,
                "capture_peak_gib": pd.to_numeric(getattr(r, f"train_capture_peak_gib_{precision}", None), errors="coerce"),
                "pool_gib": pd.to_numeric(getattr(r, f"train_graph_pool_gib_{precision}", None), errors="coerce"),
                "step_ms": pd.to_numeric(step, errors="coerce"),
                "spread_ms": pd.to_numeric(getattr(r, f"step_ms_spread_{precision}", None), errors="coerce"),
                "pipelined_ms": pd.to_numeric(getattr(r, f"step_ms_pipelined_{precision}", None), errors="coerce"),
                "volume_s": pd.to_numeric(volume, errors="coerce"),
                "host_op_us": pd.to_numeric(getattr(r, "host_elementwise_us", None), errors="coerce"),
                "host_gemm_us": pd.to_numeric(getattr(r, "host_gemm_us", None), errors="coerce"),
                "scan_backend": _text(r, "scan_backend"),
                "cuda_graphs": _graphs_text(r),
                "layout": _layout_text(r),
                "norms": _norms_text(r),
                "git_sha": r.git_sha,
                "triton_scan_settings": _text(r, "triton_scan_settings"),
                "scan_auto_failures": _text(r, "scan_auto_failures"),
            })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", type=Path, nargs="+", help="efficiency CSVs of one config (results/efficiency/<device>/<config>.csv)")
    source.add_argument("--measure", action="store_true", help="measure on this GPU first (BraTS 128^3, every mode of --modes)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="with --measure: which modes (default: all)")
    p.add_argument("--out", type=Path, default=Path("results") / "perf", help="default: results/perf of the working directory")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    args = p.parse_args(argv)
    tables = measure(tuple(args.models), args.out / "model_step_source", tuple(args.modes)) if args.measure else args.table
    missing = [str(t) for t in tables if not t.is_file()]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not found; run `make bench-efficiency` on the GPU first")
    stems = {t.stem for t in tables}
    if len(stems) != 1:
        raise SystemExit(f"error: the tables are of different configs ({', '.join(sorted(stems))}); give one config's tables")
    stem = stems.pop()
    try:
        spec = get_dataset_spec(stem)
    except ValueError as err:
        raise SystemExit(f"error: {tables[0]}: {err}") from None
    config = f"{stem} {'x'.join(map(str, spec.patch))} b1"
    df = pd.concat([reshape(pd.read_csv(t), config, tuple(args.models)) for t in tables], ignore_index=True)
    if df.empty:
        raise SystemExit(f"error: none of {args.models} in {', '.join(map(str, tables))}")
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "model_step.csv", index=False, float_format="%.4g")
    root = project_root()
    shown = ", ".join(f"`{t.relative_to(root) if t.is_absolute() and t.is_relative_to(root) else t}`" for t in tables)
    md = [
        f"# Whole-model training step, {config}",
        "",
        f"From {shown} ({runs_text(df.drop_duplicates(['model', 'git_sha']))}; each row measured alone on one GPU; "
        f"cards: {', '.join(sorted(df.device.astype(str).unique()))}). "
        "the training step the efficiency profiler of that git SHA timed (see the source tables' headers), batch 1, synthetic tensors; "
        "step_ms = median of steps synchronised one by one; spread_ms = the slowest of them minus the fastest (empty: "
        "not recorded by that run); pipelined_ms = mean of steps run back to back, as a fit runs "
        "them (empty: not measured by that run); "
        "peak = max_memory_allocated (GiB), with CUDA graphs plus the part of the graphs' memory pool no live tensor holds "
        "(an upper bound: a replay allocates nothing the allocator counts); an empty peak was not validly measured in "
        "that run (`results/perf/scan_notes.md` says why); reserved = max_memory_reserved (GiB), what the process held "
        "from the GPU, the graphs' pool included: the like-for-like memory of an eager and a graphed step; "
        "capture_peak_gib, pool_gib (graphed rows; empty: not recorded by that run): the capture's own peak (its eager "
        "warm-up included) and the graphs' memory pools' whole size, the two parts the peak is the larger of; "
        "bf16 = autocast, fp32 weights; "
        "cuda_graphs: how many ToM layers replayed CUDA graphs (`configs/callbacks/cuda_graphs.yaml` in training), "
        "`whole step` = the forward, loss and backward replayed as CUDA graphs (`configs/callbacks/step_graphs.yaml`), "
        "- = all eager; layout: NDHWC = `--model.channels_last true`; norms: whole-tensor = `--model.fast_norms true` "
        "(GroupNorm and InstanceNorm by whole-tensor reductions), whole-tensor GroupNorm = `--model.fast_norms group` "
        "(GroupNorm only), torch = PyTorch's kernels. "
        f"volume_s: sliding-window inference of one whole {'x'.join(map(str, spec.volume))} volume "
        f"({spec.in_channels} channels, ROI = the patch, overlap 0.5, batch 1, eval, no grad), seconds. "
        "host_op_us, host_gemm_us: what one elementwise op and one small cuBLAS GEMM cost that row's process on the "
        "host, in microseconds (`segresmamba.profiling.host`; empty: not recorded by that run): a step bound by its host "
        "is as fast as its host.",
        "",
        df.drop(columns=["triton_scan_settings", "scan_auto_failures"]).to_markdown(index=False, floatfmt=".3g"),
    ]
    failed = df[(df.scan_auto_failures != "-") & (df.precision == "bf16")]
    if len(failed):  # their times ran without the backends that failed: not the code's speed
        md += ["", "**Scan backends failed while measured** (left out, so these rows ran on slower paths): " + "; ".join(
            f"{r.model} ({r.cuda_graphs}, {r.layout}, {r.norms}, git {str(r.git_sha)[:7]}): {r.scan_auto_failures}"
            for r in failed.itertuples()) + "."]
    settings = sorted({s for s in df.triton_scan_settings if s != "-"})
    if settings:  # rows measured before the profiler recorded them have none
        md += ["", "Triton scan launch settings of the rows that ran it (`segresmamba.ssm.triton.tuning.TUNING`; per row in "
               "the CSV): " + "; ".join(f"`{s}`" for s in settings) + "."]
    (args.out / "model_step.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
