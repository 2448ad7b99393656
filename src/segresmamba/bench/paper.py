"""The paper's published figures (Das et al., MIDL 2025, Tables 1-3, 5, 6, 8 and Table 7), read from
``results/paper/*.csv``. They are shown beside ours, never mixed into ours."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PAPER_DIR = Path(__file__).resolve().parents[3] / "results" / "paper"
# ML CO2 Impact calculator inputs behind the paper's Table 6 / Fig. 3 (paper-spec section 2.5)
PAPER_GPU_TDP_KW = 0.25  # A100 PCIe
PAPER_GRID_KG_PER_KWH = 0.61  # AWS eu-central-1


def paper_figures() -> pd.DataFrame:
    """Long table: table, dataset, model, metric, value, unit, note."""
    return pd.read_csv(PAPER_DIR / "paper_figures.csv")


def paper_value(dataset: str, model: str, metric: str) -> float | None:
    df = paper_figures()
    hit = df[(df.dataset == dataset) & (df.model == model) & (df.metric == metric)]
    return float(hit.value.iloc[0]) if len(hit) else None


def paper_wide(dataset: str, metrics: dict[str, str]) -> pd.DataFrame:
    """One row per model, columns renamed by ``metrics`` (paper metric -> our column name)."""
    df = paper_figures()
    df = df[(df.dataset == dataset) & df.metric.isin(list(metrics))]
    wide = df.pivot_table(index="model", columns="metric", values="value", aggfunc="first").rename(columns=metrics)
    return wide.reset_index()


def calculator_co2_kg(hours: float, tdp_kw: float = PAPER_GPU_TDP_KW, grid: float = PAPER_GRID_KG_PER_KWH) -> float:
    """The paper's CO2 method: training hours x GPU TDP x grid intensity (Lacoste et al. 2019)."""
    return hours * tdp_kw * grid
