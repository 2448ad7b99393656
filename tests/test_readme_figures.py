"""The README's BraTS efficiency, GPU-hours and robustness tables say what the committed result tables say.

The README copies its figures from ``results/efficiency/nvidia-h200/`` and ``results/robustness/nvidia-h200/``; a
row measured again there and not copied, or copied wrong, fails here. A README figure agrees where it is the
table's value rounded as shown (half a unit of its last digit); the README's results table names only committed
files."""

import math
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "efficiency" / "nvidia-h200"
EFFICIENCY_HEADER = "| model | params (M) | GMACs | paper GMACs |"
GPU_HOURS_HEADER = "| model | epoch (s) | total GPU h, 5 folds |"
ROBUSTNESS_HEADER = "| model | recipe | clean Dice |"
# README column -> the efficiency table's column
EFFICIENCY_COLUMNS = {
    "params (M)": "params_m", "GMACs": "gmacs", "paper GMACs": "paper_macs_g", "peak GiB fp32": "train_peak_gib_fp32",
    "peak GiB bf16": "train_peak_gib_bf16", "paper GB": "paper_train_mem_gb", "step ms fp32 (sync)": "step_ms_fp32",
    "step ms bf16 (sync)": "step_ms_bf16", "step ms bf16 (back to back)": "step_ms_pipelined_bf16",
    "volume s bf16 (240x240x155)": "infer_volume_s_bf16", "host GEMM µs": "host_gemm_us",
}
GPU_HOURS_COLUMNS = {"epoch (s)": "epoch_s", "total GPU h, 5 folds": "total_gpu_h", "paper epoch (s, A100)": "paper_epoch_s",
                     "paper 5-fold h": "paper_5fold_h"}
NUMBER = re.compile(r"-?\d+(?:\.(\d+))?(?:e([+-]\d+))?")


def readme_rows(header: str) -> tuple[list[str], list[list[str]]]:
    """The README's markdown table that starts with ``header``: its column names and its rows' cells."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return names, rows


def readme_table(header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The README's table that starts with ``header``, its rows by model (the first cell, bold or not)."""
    names, rows = readme_rows(header)
    return names, {cells[0].strip("*"): cells for cells in rows}


def shown_value(cell: str) -> tuple[float, float] | None:
    """The first number of a README cell and half a unit of its last shown digit; None for an empty cell."""
    match = NUMBER.search(cell.replace("**", ""))
    if match is None:
        return None
    decimals, exponent = len(match.group(1) or ""), int(match.group(2) or 0)
    return float(match.group(0)), 0.5 * 10.0 ** (exponent - decimals)


def shown_agrees(cell: str, value: float) -> bool:
    """Whether ``value`` rounds to the number ``cell`` shows (within half a unit of its last digit)."""
    shown, half_unit = shown_value(cell)
    return math.isclose(shown, value, abs_tol=half_unit * 1.001)


def test_shown_value_reads_the_rounding_of_a_cell():
    assert shown_value("174 (8.1 in scans)") == (174.0, 0.5)
    assert shown_value("1.39e+03") == (1390.0, 5.0)
    assert shown_value("**43.4**") == (43.4, pytest.approx(0.05))
    assert shown_value("") is None


def _disagreements(names: list[str], rows: dict[str, list[str]], table: pd.DataFrame, columns: dict[str, str]) -> list[str]:
    wrong = []
    for model, cells in rows.items():
        found = table[table.model == model]
        if found.empty:
            wrong.append(f"{model}: in the README, not in the results table")
            continue
        row = found.iloc[-1]
        for name, cell in zip(names, cells):
            if name not in columns:
                continue
            value, empty = row[columns[name]], shown_value(cell) is None
            if empty or pd.isna(value):
                if empty != pd.isna(value):
                    wrong.append(f"{model} {name}: README {cell!r}, table {value}")
                continue
            if not shown_agrees(cell, value):
                wrong.append(f"{model} {name}: README {cell!r}, table {value:.4g}")
    return wrong


def test_readme_brats_efficiency_table_matches_the_results():
    names, rows = readme_table(EFFICIENCY_HEADER)
    table = pd.read_csv(RESULTS / "brats.csv")
    assert set(rows) == set(table.model), "the README's BraTS table and the results table list other models"
    assert _disagreements(names, rows, table, EFFICIENCY_COLUMNS) == []
    # the scan share beside the MACs of the Mamba models
    for model, cells in rows.items():
        scans = re.search(r"\(([\d.]+) in scans\)", cells[names.index("GMACs")])
        if scans:
            assert shown_agrees(scans.group(1), table[table.model == model].iloc[-1].scan_gmacs), model


def test_readme_gpu_hours_table_matches_the_results():
    names, rows = readme_table(GPU_HOURS_HEADER)
    hours = pd.read_csv(RESULTS / "gpu_hours.csv")
    brats = hours[hours.config == "brats"]
    assert set(rows) == set(brats.model)
    assert _disagreements(names, rows, brats, GPU_HOURS_COLUMNS) == []
    total = re.search(r"All ten models on BraTS: about (\d+) H200 hours", (ROOT / "README.md").read_text())
    assert total and abs(int(total.group(1)) - brats.total_gpu_h.sum()) <= 0.5


def test_readme_robustness_table_matches_the_results():
    names, rows = readme_rows(ROBUSTNESS_HEADER)
    table = pd.read_csv(ROOT / "results" / "robustness" / "nvidia-h200" / "robustness.csv")
    cells_by_run = {(cells[0], cells[1]): dict(zip(names, cells)) for cells in rows}
    assert set(cells_by_run) == set(zip(table.model, table.recipe)), "the README's robustness table and the results list other runs"
    wrong = []
    for (model, recipe), cells in cells_by_run.items():
        row = table[(table.model == model) & (table.recipe == recipe)].iloc[-1]
        worst = re.fullmatch(r"(\w+) \(([\d.]+)\)", cells["worst shift"])
        hd_clean, hd_shifted = cells["HD95 clean / shifted (mm)"].split(" / ")
        checks = [(cells["clean Dice"], row.clean_dice), (cells["shifted Dice (mean of 7)"], row.shifted_dice),
                  (cells["ratio"], row.ratio), (worst.group(2), row[f"dice_{row.worst_shift}"]),
                  (hd_clean, row.clean_hd95_mm), (hd_shifted, row.shifted_hd95_mm)]
        if worst.group(1) != row.worst_shift:
            wrong.append(f"{model}/{recipe} worst shift: README {worst.group(1)}, table {row.worst_shift}")
        for cell, value in checks:
            if not shown_agrees(cell, value):
                wrong.append(f"{model}/{recipe}: README {cell!r}, table {value:.4g}")
    assert wrong == []


def _committed_paths(cell: str) -> list[str]:
    """The glob patterns of the files a cell of the README's results table names: each backticked name, a bare one
    in the folder of the cell's first path, ``<...>`` a wildcard, ``{a,b}`` each of its parts."""
    names = re.findall(r"`([^`]+)`", cell)
    folder = names[0].rsplit("/", 1)[0] + "/" if names and "/" in names[0] else ""
    patterns = []
    for name in names:
        path = name if name.startswith("results/") else folder + name
        path = re.sub(r"<[^>]+>", "*", path)
        alternatives = re.search(r"\{([^}]+)\}", path)
        patterns += ([path.replace(alternatives.group(0), part) for part in alternatives.group(1).split(",")]
                     if alternatives else [path])
    return patterns


def test_every_file_the_results_table_names_is_committed():
    _, rows = readme_rows("| file | what | command |")
    patterns = [p for cells in rows for p in _committed_paths(cells[0])]
    assert len(patterns) > 15
    missing = [p for p in patterns if not any(ROOT.glob(p.rstrip("/")))]
    assert missing == []
