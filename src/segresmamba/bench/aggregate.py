"""Aggregate sweep results into tables and the paper's figures.

    python -m segresmamba.bench.aggregate results/quick/brats      # -> summary.csv, summary.md, fig2/fig3 PNGs

or from Python: ``aggregate("results/quick/brats")`` (returns the summary table).

Reads every ``<dir>/<recipe>/<model>/fold<k>/metrics.json`` (and ``<dir>/<model>/fold<k>/metrics.json`` of
sweeps from before recipes existed); writes ``runs.csv``, ``summary.csv`` and ``summary.md`` (mean ± std over
folds per recipe and model, with the recipe and the reported checkpoint in their own columns: records
without them are ``paper`` and ``best``, what every run reported then; ``skipped_cases``: the cases that
validation left out, listed per run and counted per model), ``paper_vs_ours.md`` side by side,
and plots: Fig. 2 (mean Dice vs training memory), Fig. 3 (mean Dice vs CO2) and, with ``--efficiency``, a
MACs chart. Plot titles name the recipe, the device, the data (real or synthetic) and the protocol.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from segresmamba.bench.paper import paper_figures  # noqa: E402
from segresmamba.data.spec import spec_of_data_name  # noqa: E402

__all__ = ["aggregate", "load_runs", "summarise", "write_markdown", "plot_figures", "plot_macs", "plot_memory"]

NUMERIC = ("val_best_dice_mean", "untrained_dice_mean", "best_epoch", "epochs", "fit_wall_s", "step_ms", "peak_gib", "energy_kwh", "co2_kg",
           "calculator_co2_kg", "params_m")
# what records written before recipes and checkpoint choice were recorded ran and reported
LEGACY_RECIPE, LEGACY_CHECKPOINT = "paper", "best"


def _spec_name(data_names: str) -> str:
    """The dataset spec name of the first recorded data-module name (``msd_spleen`` -> ``spleen``)."""
    first = data_names.split(";")[0].strip()
    spec = spec_of_data_name(first)
    return spec.name if spec else first


def load_runs(result_dir: Path) -> pd.DataFrame:
    """One row per run (recipe, model, fold) from the metrics.json files."""
    rows = []
    for path in sorted(result_dir.rglob("fold*/metrics.json")):
        rec = json.loads(path.read_text())
        fit, test = rec.get("fit") or {}, rec.get("test") or {}
        best = (fit.get("best") or {})
        energy = fit.get("energy") or {}
        data = rec.get("data") or {}
        prov = rec.get("provenance") or {}
        row = {
            "model": rec.get("model") or path.parent.parent.name,
            "recipe": rec.get("recipe") or LEGACY_RECIPE,
            "reported_checkpoint": rec.get("reported_checkpoint") or test.get("reported_checkpoint") or LEGACY_CHECKPOINT,
            "fold": rec.get("fold", int(path.parent.name.removeprefix("fold"))),
            "status": rec.get("status", "ok"),
            "error": rec.get("error"),
            "dataset": data.get("dataset"),
            "provenance": data.get("provenance"),
            "test_dice_mean": test.get("test/dice_mean"),
            "val_best_dice_mean": best.get("val/dice_mean"),
            "untrained_dice_mean": (fit.get("untrained") or {}).get("val/dice_mean"),
            "best_epoch": best.get("epoch"),
            "epochs": fit.get("epochs"),
            "fit_wall_s": fit.get("wall_time_s"),
            "step_ms": fit.get("median_step_ms"),
            "peak_gib": fit.get("peak_memory_allocated_gib"),
            "energy_kwh": energy.get("energy_kwh"),
            "co2_kg": energy.get("co2_kg"),
            "calculator_co2_kg": rec.get("paper_calculator_co2_kg"),
            "params_m": (rec.get("params") or 0) / 1e6 or None,
            "device": prov.get("device"),
            "precision": prov.get("precision"),
            "git_sha": prov.get("git_sha"),
            "protocol": rec.get("protocol"),
            "skipped_cases": ", ".join(case["case_id"] for case in rec.get("skipped_cases") or []),
        }
        for key, value in test.items():
            if key.startswith("test/dice_") and key != "test/dice_mean":
                row[key.replace("test/", "test_")] = value
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in df.columns:  # a metric that is None in every run must still be a (NaN) number column
        if col.startswith("test_") or col in NUMERIC:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over folds per recipe and model (successful runs only), with the failures counted."""
    keys = ["recipe", "model"]
    ok = runs[runs.status == "ok"]
    numeric = [c for c in ok.columns if c not in ("model", "fold") and pd.api.types.is_numeric_dtype(ok[c])]
    grouped = ok.groupby(keys)[numeric]
    summary = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std"))
    summary["folds"] = ok.groupby(keys).size()
    summary = summary.reindex(pd.MultiIndex.from_frame(runs[keys].drop_duplicates()))  # runs that all failed too
    summary["folds"] = summary["folds"].fillna(0).astype(int)
    summary["failed"] = runs[runs.status != "ok"].groupby(keys).size()
    summary["failed"] = summary["failed"].fillna(0).astype(int)
    summary["skipped_cases"] = runs.groupby(keys)["skipped_cases"].agg(lambda s: len({c for v in s for c in v.split(", ") if c}))
    for col in ("reported_checkpoint", "device", "precision", "git_sha", "provenance", "dataset", "protocol"):
        summary[col] = runs.groupby(keys)[col].agg(lambda s: ", ".join(sorted({str(v) for v in s if v is not None})))
    return summary.reset_index().sort_values(["recipe", "test_dice_mean_mean"], ascending=[True, False], na_position="last")


def _pm(mean, std, digits=3):
    if pd.isna(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")


def _meta(summary: pd.DataFrame) -> dict[str, str]:
    def first(col):
        vals = [v for v in summary[col].dropna().unique() if v]
        return "; ".join(vals) if vals else "?"

    return {k: first(k) for k in ("recipe", "reported_checkpoint", "device", "precision", "git_sha", "provenance", "dataset", "protocol")}


def _protocol_text(meta: dict[str, str]) -> str:
    """The protocol, with the precision added unless it already names it."""
    return meta["protocol"] if meta["precision"] in meta["protocol"] else f"{meta['protocol']}, {meta['precision']}"


def write_markdown(summary: pd.DataFrame, runs: pd.DataFrame, out: Path) -> None:
    meta = _meta(summary)
    lines = [
        f"# Sweep summary: {meta['dataset']} ({meta['provenance']})",
        "",
        f"Protocol: {meta['protocol']}. Recipe: {meta['recipe']}. Device: {meta['device']}. Precision: {meta['precision']}. git {meta['git_sha']}.",
        "Mean ± std over folds. Dice = test Dice (whole volumes, sliding window) of the checkpoint in the `checkpoint` column: "
        "`last` = the final weights, `best` = the best validation Dice (optimistic when the test cases are the validation cases).",
        "",
        "Untrained = the validation Dice of the same network before its first step (Lightning's sanity check).",
        "",
        "| recipe | model | checkpoint | folds | test mean Dice | best val mean Dice | untrained val Dice | epochs | fit wall (s) | step (ms) | peak GiB | energy (kWh) | CO2 (kg) | failed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary.itertuples():
        lines.append(
            f"| {r.recipe} | {r.model} | {r.reported_checkpoint or '–'} | {r.folds} | {_pm(r.test_dice_mean_mean, r.test_dice_mean_std)} | "
            f"{_pm(r.val_best_dice_mean_mean, r.val_best_dice_mean_std)} | {_pm(r.untrained_dice_mean_mean, None)} | "
            f"{_pm(r.epochs_mean, None, 0)} | "
            f"{_pm(r.fit_wall_s_mean, None, 0)} | {_pm(r.step_ms_mean, None, 0)} | "
            f"{'not measured' if pd.isna(r.peak_gib_mean) else _pm(r.peak_gib_mean, None, 2)} | "
            f"{_pm(r.energy_kwh_mean, None, 5)} | {_pm(r.co2_kg_mean, None, 5)} | {r.failed} |"
        )
    skipped = sorted({c for v in runs.skipped_cases for c in v.split(", ") if c})
    if skipped:
        lines += ["", f"Cases left out by validation (skip_bad_cases: true; why: skipped_cases in each metrics.json): {', '.join(skipped)}"]
    errors = runs[runs.status != "ok"]
    if len(errors):
        lines += ["", "Failed runs:", ""] + [f"- {e.model} [{e.recipe}] fold {e.fold}: {e.error}" for e in errors.itertuples()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")

    dataset = _spec_name(meta["dataset"])
    paper = paper_figures()
    paper = paper[(paper.dataset == dataset) & (paper.metric == "dice_mean")].set_index("model").value
    recipes = sorted(summary.recipe.unique())
    side = ["# Paper vs ours", "", f"Paper: Das et al. 2025 ({dataset}, real data, A100, its own recipe). Ours: {meta['provenance']} data, {_protocol_text(meta)}, {meta['device']}, git {meta['git_sha'][:10]}.",
            "The columns answer different questions when our data is synthetic; they are never mixed.", "",
            "| model | paper mean Dice | " + " | ".join(f"ours mean Dice, recipe {r}" for r in recipes) + " |",
            "|---|---:|" + "---:|" * len(recipes)]
    for model in sorted(set(summary.model) | set(paper.index)):
        cells = []
        for recipe in recipes:
            ours = summary[(summary.model == model) & (summary.recipe == recipe)]
            cells.append(_pm(ours.test_dice_mean_mean.iloc[0], ours.test_dice_mean_std.iloc[0]) if len(ours) else "–")
        side.append(f"| {model} | {f'{paper[model]:.4f}' if model in paper.index else '–'} | {' | '.join(cells)} |")
    (out / "paper_vs_ours.md").write_text("\n".join(side) + "\n")


def _scatter(ax, xs, ys, labels, **kw):
    ax.scatter(xs, ys, **kw)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)


def plot_figures(summary: pd.DataFrame, out: Path) -> list[Path]:
    meta = _meta(summary)
    dataset = _spec_name(meta["dataset"])
    paper = paper_figures()
    paper = paper[paper.dataset == dataset]
    several = summary.recipe.nunique() > 1
    labels = [f"{m} [{r}]" if several else m for m, r in zip(summary.model, summary.recipe)]
    summary = summary.assign(label=labels)
    # the protocol line can be long: wrap it so the title stays inside the figure
    title_tail = "\n".join(textwrap.wrap(
        f"recipe {meta['recipe']} · {meta['provenance']} data · {meta['device']} · {_protocol_text(meta)} · git {meta['git_sha'][:10]}", 120))
    written = []
    for fig_name, x_col, x_label, paper_metric in (
        ("fig2_dice_vs_memory.png", "peak_gib_mean", "peak training memory (GiB)", "train_memory"),
        ("fig3_dice_vs_co2.png", "co2_kg_mean", "CO2 per run (kg, codecarbon)", "co2_5fold"),
    ):
        fig, (ax_ours, ax_paper) = plt.subplots(1, 2, figsize=(11, 4.6))
        ours = summary.dropna(subset=["test_dice_mean_mean"])
        if x_col in ours and ours[x_col].notna().any():
            ours = ours.dropna(subset=[x_col])
            _scatter(ax_ours, ours[x_col], ours.test_dice_mean_mean, ours.label, color="tab:blue")
        else:
            ax_ours.text(0.5, 0.5, f"{x_label}\nnot measured on this device", ha="center", va="center", transform=ax_ours.transAxes)
        ax_ours.set(xlabel=x_label, ylabel="mean Dice (test)", title="ours")
        pw = paper.pivot_table(index="model", columns="metric", values="value", aggfunc="first")
        if paper_metric in pw and "dice_mean" in pw:
            pw = pw.dropna(subset=[paper_metric, "dice_mean"])
            _scatter(ax_paper, pw[paper_metric], pw["dice_mean"], pw.index, color="tab:gray")
        ax_paper.set(xlabel=x_label.replace("GiB", "GB").replace("per run (kg, codecarbon)", "5 folds (kg, calculator)"),
                     ylabel="mean Dice", title=f"paper ({dataset}, real data, A100)")
        fig.suptitle(f"{'Fig. 2' if 'memory' in fig_name else 'Fig. 3'}-style, {dataset}: {title_tail}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / fig_name, dpi=120)
        plt.close(fig)
        written.append(out / fig_name)
    return written


def plot_macs(efficiency_csv: Path, out: Path) -> Path:
    """Bar chart of our MACs beside the paper's, from an efficiency table."""
    df = pd.read_csv(efficiency_csv)
    df = df.dropna(subset=["gmacs"]).sort_values("gmacs")
    fig, ax = plt.subplots(figsize=(8, 4))
    y = range(len(df))
    ax.barh([i + 0.2 for i in y], df.gmacs, height=0.4, label="ours (fvcore + scan)")
    if "paper_macs_g" in df:
        ax.barh([i - 0.2 for i in y], df.paper_macs_g.fillna(0), height=0.4, color="tab:gray", label="paper")
    ax.set_yticks(list(y), df.model)
    ax.set_xlabel("GMACs, batch 1")
    device = df.device.iloc[0] if "device" in df else "?"
    ax.set_title(f"MACs, {efficiency_csv.stem} config · {device} · git {_shas(df)}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    dest = out / f"macs_{efficiency_csv.stem}.png"
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


def _shas(df: pd.DataFrame) -> str:
    """The short git SHAs of a table's rows (a table can hold rows of several runs)."""
    return ", ".join(sorted({str(s)[:7] for s in df.git_sha.dropna()})) if "git_sha" in df else "?"


def plot_memory(efficiency_csv: Path, out: Path) -> Path:
    """Peak training memory, ours (fp32 and bf16) beside the paper's Table 8, from an efficiency table."""
    df = pd.read_csv(efficiency_csv)
    cols = [c for c in ("train_peak_gib_fp32", "train_peak_gib_bf16") if c in df]
    for c in cols:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df = df.dropna(subset=cols, how="all").sort_values(cols[-1])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    y = list(range(len(df)))
    for offset, col, color in zip((0.27, 0.0), cols, ("tab:blue", "tab:cyan")):
        ax.barh([i + offset for i in y], df[col], height=0.27, color=color, label=f"ours, {col.rsplit('_', 1)[-1]} (GiB)")
    if "paper_train_mem_gb" in df:
        ax.barh([i - 0.27 for i in y], df.paper_train_mem_gb.fillna(0), height=0.27, color="tab:gray", label="paper, A100 (GB)")
    ax.set_yticks(y, df.model)
    ax.set_xlabel("peak training memory, batch 1 (fwd + bwd + Adam)")
    ax.set_title(f"{efficiency_csv.stem}: {df.device.iloc[0]} · torch {df.torch.iloc[0]} · git {_shas(df)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    dest = out / f"memory_{efficiency_csv.stem}.png"
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    return dest


def aggregate(result_dir: str | Path, *, efficiency: str | Path | None = None, out: str | Path | None = None) -> pd.DataFrame:
    """Tables and plots of the sweep results under ``result_dir``, written to ``out`` (default: the same
    folder); returns the summary (one row per recipe and model). ``efficiency``: an efficiency CSV whose
    MACs are charted beside. ValueError when there is nothing to aggregate."""
    result_dir = Path(result_dir)
    dest = Path(out) if out is not None else result_dir
    if not result_dir.is_dir():
        raise ValueError(f"{result_dir} is not a directory")
    runs = load_runs(result_dir)
    if runs.empty:
        raise ValueError(f"no <recipe>/<model>/fold<k>/metrics.json under {result_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    summary = summarise(runs)
    runs.to_csv(dest / "runs.csv", index=False)
    summary.to_csv(dest / "summary.csv", index=False)
    write_markdown(summary, runs, dest)
    written = plot_figures(summary, dest)
    if efficiency is not None:
        written.append(plot_macs(Path(efficiency), dest))
    for path in written:
        print(f"wrote {path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tables and plots from a sweep's metrics.json files.")
    p.add_argument("result_dir", type=Path)
    p.add_argument("--efficiency", type=Path, default=None, help="efficiency CSV for the MACs chart")
    p.add_argument("--out", type=Path, default=None, help="where the tables and plots go (default: result_dir)")
    args = p.parse_args(argv)
    if args.efficiency is not None and not args.efficiency.is_file():
        raise SystemExit(f"error: efficiency table {args.efficiency} not found")
    try:
        aggregate(args.result_dir, efficiency=args.efficiency, out=args.out)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(((args.out or args.result_dir) / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
