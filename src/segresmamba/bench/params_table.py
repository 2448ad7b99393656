"""Parameter counts of every registered model in the three dataset configurations, beside the paper's.

    python -m segresmamba.bench.params_table [--out results]

Writes ``<out>/params.csv`` and ``<out>/params.md``. Models are only built (no forward pass), so this
runs in seconds on a CPU. The configurations are the paper's (:mod:`segresmamba.data.spec`: BTCV, BraTS,
Spleen). The paper's figures (SegResMamba, Table 7, "BTCV configuration") come from
:func:`segresmamba.bench.paper.paper_params` and are shown in their own columns, never mixed into ours.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import monai
import torch

from segresmamba import create_model, list_models
from segresmamba.bench.paper import paper_params
from segresmamba.bench.project import project_root
from segresmamba.data.spec import DatasetSpec, get_dataset_spec
from segresmamba.provenance import git_sha

__all__ = ["build_rows", "count_params", "write_csv", "write_markdown", "TABLE_DATASETS"]

TABLE_DATASETS = ("btcv", "brats", "spleen")  # the configurations the paper measures (its section 3.1, Table 8)


def code_version() -> str:
    """The checkout's commit (``-dirty`` with local changes), or "uncommitted" in a repository with no commit yet."""
    sha = git_sha()
    return "uncommitted" if sha == "unknown" and (project_root() / ".git").exists() else sha


def count_params(name: str, spec: DatasetSpec) -> int | str:
    """Parameters of the registered model at ``spec``'s channels and patch, or the reason it cannot be built."""
    try:
        net = create_model(name, spec.in_channels, spec.out_channels, spec.patch)
    except ValueError as err:
        return f"n/a ({err})"
    return sum(p.numel() for p in net.parameters())


def build_rows() -> list[dict[str, object]]:
    paper = {row["model"]: row for row in paper_params().to_dict("records")}
    provenance = {"git_sha": code_version(), "torch": torch.__version__, "monai": monai.__version__}
    rows = []
    for name in sorted(set(list_models()) | set(paper)):
        row: dict[str, object] = {"model": name, "registered": name in list_models()}
        for config in TABLE_DATASETS:
            count = count_params(name, get_dataset_spec(config)) if row["registered"] else ""
            row[f"{config}_params_m"] = round(count / 1e6, 4) if isinstance(count, int) else count
        ref = paper.get(name)
        row["paper_name"] = ref["paper_name"] if ref else ""
        row["paper_params_m"] = float(ref["params_m"]) if ref else ""
        row["paper_flops_g"] = float(ref["flops_g"]) if ref else ""
        ours = row["btcv_params_m"]
        row["btcv_vs_paper_pct"] = (
            round(100 * (ours / row["paper_params_m"] - 1), 2) + 0.0 if isinstance(ours, float) and ref else ""  # no "-0.0"
        )
        row["paper_source"] = ref["source"] if ref else ""
        rows.append({**row, **provenance})
    return rows


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(rows: list[dict[str, object]], path: Path) -> None:
    def cell(value: object) -> str:
        if value == "":
            return "–"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value).split(" (")[0]  # "n/a (reason)" -> "n/a"; the reason is in the CSV

    first = rows[0]
    lines = [
        "# Parameter counts (millions)",
        "",
        "Ours: every registered model built with its defaults, counted with `sum(p.numel())`. "
        "BTCV 1 -> 14 channels at 128^3, BraTS 4 -> 3 at 128^3, Spleen 1 -> 2 at 96^3. "
        "Paper: SegResMamba (Das et al., MIDL 2025) Table 7, BTCV configuration; FLOPs as printed there (not ours).",
        "",
        f"git {first['git_sha']} · torch {first['torch']} · MONAI {first['monai']}",
        "",
        "| model | BTCV | BraTS | Spleen | paper (BTCV) | BTCV vs paper | paper FLOPs (G) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        diff = f"{r['btcv_vs_paper_pct']:+.2f} %" if isinstance(r["btcv_vs_paper_pct"], float) else "–"
        name = r["model"] if r["registered"] else f"{r['model']} (not implemented)"
        lines.append(
            f"| {name} | {cell(r['btcv_params_m'])} | {cell(r['brats_params_m'])} | {cell(r['spleen_params_m'])} "
            f"| {cell(r['paper_params_m'])} | {diff} | {cell(r['paper_flops_g'])} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results/ of the working directory)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = build_rows()
    write_csv(rows, args.out / "params.csv")
    write_markdown(rows, args.out / "params.md")
    print((args.out / "params.md").read_text())


if __name__ == "__main__":
    main()
