"""Whole-model training step, long format: ``results/perf/model_step.csv`` and ``.md``.

The figures come from the efficiency profiler's table of one device (``results/efficiency/<device>/brats.csv``:
fwd + bwd + Adam step, batch 1, synthetic tensors), reshaped to one row per (model, precision) so the
models compare side by side with the scan benchmarks:

    python -m benchmarks.model_step --table results/efficiency/nvidia-h200/brats.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from benchmarks.runs import runs_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = ("segresmamba", "segresmamba_notom", "swinunetr", "unetr", "nnunet", "segmamba")


def reshape(table: pd.DataFrame, config: str, models: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for r in table[table.model.isin(models)].itertuples():
        for precision in ("bf16", "fp32"):
            peak, step = getattr(r, f"train_peak_gib_{precision}", None), getattr(r, f"step_ms_{precision}", None)
            rows.append({
                "device": r.device, "model": r.model, "config": config, "precision": precision,
                "peak_gib": pd.to_numeric(peak, errors="coerce"), "step_ms": pd.to_numeric(step, errors="coerce"),
                "scan_backend": getattr(r, "scan_backend", None) if isinstance(getattr(r, "scan_backend", None), str) else "-",
                "git_sha": r.git_sha,
            })
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, required=True, help="an efficiency CSV (results/efficiency/<device>/<config>.csv)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "perf")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    args = p.parse_args(argv)
    if not args.table.is_file():
        raise SystemExit(f"error: {args.table} not found; run `make bench-efficiency` on the GPU first")
    config = f"{args.table.stem} 128^3 b1" if args.table.stem in ("brats", "btcv") else f"{args.table.stem} 96^3 b1"
    df = reshape(pd.read_csv(args.table), config, tuple(args.models))
    if df.empty:
        raise SystemExit(f"error: none of {args.models} in {args.table}")
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "model_step.csv", index=False, float_format="%.4g")
    md = [
        f"# Whole-model training step, {config}",
        "",
        f"From `{args.table.relative_to(ROOT) if args.table.is_absolute() else args.table}` ({runs_text(df.drop_duplicates('model'))}; each row measured alone on one GPU; cards: {', '.join(sorted(df.device.astype(str).unique()))}). "
        "fwd + bwd + Adam step on synthetic tensors; peak = max_memory_allocated (GiB); bf16 = autocast, fp32 weights.",
        "",
        df.to_markdown(index=False, floatfmt=".3g"),
    ]
    (args.out / "model_step.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
