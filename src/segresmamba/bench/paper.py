"""The paper's published figures (Das et al., MIDL 2025, Tables 1-3, 5, 6, 8 and Table 7), read from
``results/paper/*.csv`` of the project (:func:`segresmamba.bench.project.project_root`). This module is
their one reader; they are shown beside ours, never mixed into ours."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd

from segresmamba.bench.project import resolve

__all__ = ["paper_figures", "paper_value", "paper_wide", "paper_params", "paper_columns", "calculator_co2_kg"]

PAPER_DIR = Path("results") / "paper"
# ML CO2 Impact calculator inputs behind the paper's Table 6 / Fig. 3 (paper-spec section 2.5)
PAPER_GPU_TDP_KW = 0.25  # A100 PCIe
PAPER_GRID_KG_PER_KWH = 0.61  # AWS eu-central-1


@functools.lru_cache(maxsize=4)
def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(
            f"the paper's figures {path} are missing; run from the project folder (or set SEGRESMAMBA_ROOT)"
        )
    return pd.read_csv(path)


def paper_figures() -> pd.DataFrame:
    """Long table of Tables 1-3, 5, 6 and 8: table, dataset, model, metric, value, unit, note."""
    return _read(resolve(PAPER_DIR / "paper_figures.csv")).copy()


def paper_params() -> pd.DataFrame:
    """Table 7 (BTCV configuration): model, paper_name, params_m, flops_g, source."""
    return _read(resolve(PAPER_DIR / "table7_params_flops.csv")).copy()


def paper_value(dataset: str, model: str, metric: str) -> float | None:
    df = paper_figures()
    hit = df[(df.dataset == dataset) & (df.model == model) & (df.metric == metric)]
    return float(hit.value.iloc[0]) if len(hit) else None


def paper_wide(dataset: str, metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per model of ``dataset``; with ``metrics`` only those, renamed (paper metric -> our column)."""
    df = paper_figures()
    df = df[df.dataset == dataset]
    if metrics is not None:
        df = df[df.metric.isin(list(metrics))]
    wide = df.pivot_table(index="model", columns="metric", values="value", aggfunc="first")
    if metrics is not None:
        wide = wide[[m for m in metrics if m in wide.columns]].rename(columns=metrics)
    wide.columns.name = None
    return wide.reset_index()


def paper_columns(dataset: str) -> pd.DataFrame:
    """The paper's efficiency figures of ``dataset`` as ``paper_*`` columns beside an efficiency table:
    MACs, training memory, inference time and, for BTCV (Table 7's configuration), params and FLOPs."""
    wide = paper_wide(dataset, {"macs": "paper_macs_g", "train_memory": "paper_train_mem_gb", "inference_time": "paper_infer_s"})
    if dataset == "btcv":
        table7 = paper_params()[["model", "params_m", "flops_g"]].rename(columns={"params_m": "paper_params_m", "flops_g": "paper_flops_g"})
        wide = wide.merge(table7, on="model", how="outer")
    return wide


def calculator_co2_kg(hours: float, tdp_kw: float = PAPER_GPU_TDP_KW, grid: float = PAPER_GRID_KG_PER_KWH) -> float:
    """The paper's CO2 method: training hours x GPU TDP x grid intensity (Lacoste et al. 2019)."""
    return hours * tdp_kw * grid
