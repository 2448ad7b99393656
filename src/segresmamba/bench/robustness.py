"""Robustness to acquisition shifts on real MRI: does a trained net still segment a scan from another scanner?

    python -m segresmamba.bench.robustness configs/bench/robustness_quick.yaml     # CPU, minutes
    python -m segresmamba.bench.robustness configs/bench/robustness_gpu.yaml       # one H200, about 8 min (estimated)
    make bench-robustness PROFILE=quick|gpu

or from Python: ``run_robustness("configs/bench/robustness_quick.yaml")``.

What it does, through the same CLI and sweep path as every other result:

1. Writes the held-out slab of the embedded MNI152 template (``mni152_tissue``, slab ``fold``; a real T1
   MRI template, the training slabs are the rest) as a NIfTI test set with its true affine ("clean"), and
   once per acquisition shift of :mod:`segresmamba.data.shifts` (voxel size and anisotropy, orientation,
   larger field of view padded with air, bias field, gamma, noise, all combined), each shift applied once
   with a fixed seed, in the ``imagesTs/`` + ``labelsTs/`` layout of :mod:`segresmamba.data.external`.
2. Trains every run of the sweep once on the training slabs: :func:`segresmamba.bench.sweep.run_sweep` (its
   runs, :meth:`~segresmamba.bench.sweep.Sweep.runs`: every model x recipe with one ``segresmamba fit``
   each, tested on the in-memory clean slab with the final weights; the external baseline ``nnunetv2``
   once, under its own recipe ``nnunetv2``, trained by nnU-Net itself).
3. Tests the final weights (never ones chosen on a validation score) of each run on the clean set and
   every shifted set. Our nets: ``last.ckpt`` through ``segresmamba test ... --data.init_args.test_dir
   <set> --ckpt_path last.ckpt`` (the CLI's own entry point, called in this process once per set to spare
   the start-up). ``nnunetv2``: nnU-Net's ``nnUNetPredictor`` with the final checkpoint of the model folder
   its fit recorded, on the set's files as stored, masks scored by the same code as its fit
   (:mod:`segresmamba.bench.nnunetv2`). Scores are taken in each scan's own space (the evaluation inverts
   resampling and orientation) when the task does so, Dice and HD95 per case and class
   (``<set>_test_cases.csv`` beside each record ``<set>.json``).
4. Writes ``robustness.csv`` (one row per model and recipe: clean Dice, Dice per shift, mean shifted Dice,
   shifted / clean ratio, worst shift, HD95 clean and shifted, provenance), ``robustness_sets.csv`` (one row
   per model, recipe and test set), ``robustness.md`` and ``robustness.png`` to
   ``results/robustness/<card>/``; ``<card>`` is the GPU's name (``nvidia-h200``) or ``cpu``.

The failure this exposes (reference: a net trained by the suite predicting the air around a head as
foreground on a scan from another scanner) shows as a low ratio on the ``field_of_view``, ``noise`` and
``all`` sets. The issue's target for the GPU profile: with the ``nnunet`` recipe, shifted Dice >= 0.9 x
clean Dice for ``nnunet`` and ``segresmamba``.

A robustness file is a sweep file (:class:`segresmamba.bench.sweep.Sweep`; ``dataset: mni152_tissue``; its
``nnunetv2:`` block sets how nnU-Net trains and predicts when ``models`` names ``nnunetv2``) with one more
block::

    robustness: {shifts: [resolution, orientation, ...], shift_seed: 0}
"""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from segresmamba.bench import nnunetv2 as external  # noqa: E402
from segresmamba.bench.configs import instantiate_datamodule, read_yaml  # noqa: E402
from segresmamba.bench.project import resolve  # noqa: E402
from segresmamba.bench.sweep import Run, Sweep, SweepInterrupted, run_command, run_sweep  # noqa: E402
from segresmamba.data.external import write_test_case  # noqa: E402
from segresmamba.data.shifts import SHIFTS, apply_shift  # noqa: E402
from segresmamba.errors import command_line  # noqa: E402

__all__ = [
    "CLEAN",
    "DATA_TEXT",
    "held_out_slab",
    "load_robustness",
    "robustness_table",
    "run_robustness",
    "test_checkpoint",
    "nnunetv2_on_test_sets",
    "write_outputs",
    "write_test_sets",
]

CLEAN = "clean"
DATA_TEXT = "real (MNI152 template)"


# -- the test sets ---------------------------------------------------------------------------------


def held_out_slab(datamodule) -> tuple[nib.Nifti1Image, nib.Nifti1Image, str]:
    """The held-out (test) slab of an :class:`~segresmamba.data.mni152.MNI152TissueDataModule` as stored
    NIfTI: raw template intensities and labels, cut from the template with its true affine; and the
    module's case id for it."""
    from segresmamba.data.mni152 import mni152_tissue_volumes

    datamodule.setup("test")
    image, label, affine = mni152_tissue_volumes(datamodule.resolution)
    v0, v1 = datamodule.slabs["val"]
    index = [slice(None)] * 3
    index[datamodule.axis_index] = slice(v0, v1)
    cut = tuple(index)
    case_id = datamodule.items("test")[0]["case_id"]
    return nib.Nifti1Image(image, affine).slicer[cut], nib.Nifti1Image(label, affine).slicer[cut], case_id


def write_test_sets(
    image: nib.Nifti1Image, label: nib.Nifti1Image, case_id: str, root: str | Path, shifts: Sequence[str], seed: int
) -> dict[str, Path]:
    """``{set name: test_dir}``: the clean volume and one shifted copy per shift, each a one-case test set
    under ``root/<set>/``; ``root/sets.json`` describes each (shift, what it mimics, seed, shape, voxel
    size, orientation)."""
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        raise ValueError(f"unknown shift(s) {unknown}; known: {', '.join(SHIFTS)}")
    root = Path(root)
    sets, facts = {}, {}
    for name in [CLEAN, *shifts]:
        shifted = (image, label) if name == CLEAN else apply_shift(name, image, label, seed=seed)
        write_test_case(root / name, case_id, *shifted)
        sets[name] = root / name
        facts[name] = {
            "mimics": "the held-out slab as stored" if name == CLEAN else SHIFTS[name].mimics,
            "seed": None if name == CLEAN else seed,
            "shape": list(shifted[0].shape),
            "voxel_mm": [round(float(v), 3) for v in nib.affines.voxel_sizes(shifted[0].affine)],
            "orientation": "".join(nib.aff2axcodes(shifted[0].affine)),
        }
    (root / "sets.json").write_text(json.dumps(facts, indent=2))
    return sets


# -- the runs --------------------------------------------------------------------------------------


def load_robustness(path: str | Path, runs_dir: str | None = None) -> tuple[Sweep, list[str], int]:
    """(the training sweep, the shifts, the shift seed) of a robustness file; ValueError naming the file
    and the key at fault. The sweep part is written beside the runs as ``sweep.yaml`` and read by
    :meth:`Sweep.load` (every check of a sweep applies)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"robustness file {path} not found (see configs/bench/robustness_*.yaml)")
    raw = read_yaml(path, "robustness file") or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("robustness"), dict):
        raise ValueError(f"{path}: needs a `robustness: {{shifts: [...], shift_seed: 0}}` block beside the sweep keys")
    block = raw.pop("robustness")
    shifts, seed = block.get("shifts", list(SHIFTS)), block.get("shift_seed", 0)
    if not isinstance(shifts, list) or not shifts or any(s not in SHIFTS for s in shifts):
        raise ValueError(f"{path}: robustness.shifts must be a non-empty list of {', '.join(SHIFTS)}; got {shifts}")
    if raw.get("dataset") != "mni152_tissue":
        raise ValueError(f"{path}: the robustness benchmark trains on dataset mni152_tissue, got {raw.get('dataset')!r}")
    if runs_dir:
        raw["runs_dir"] = str(runs_dir)
    sweep_file = resolve(raw.get("runs_dir", "runs")) / str(raw.get("name", "robustness")) / "sweep.yaml"
    sweep_file.parent.mkdir(parents=True, exist_ok=True)
    sweep_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        sweep = Sweep.load(sweep_file)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return sweep, list(shifts), int(seed)


def last_checkpoint(run_dir: Path) -> Path:
    """The newest ``last.ckpt`` under a run's folder (the final weights of its fit)."""
    found = sorted(run_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ValueError(f"no last.ckpt under {run_dir}: the robustness sweep keeps the final weights with configs/callbacks/keep_last.yaml")
    return found[-1]


def _record_each_set(
    run: Run, checkpoint: Path, test_sets: dict[str, Path], records: Path, test_set: Callable[[str, Path, Path], None]
) -> list[dict]:
    """``test_set(name, test_dir, record_path)`` for each test set, which writes the set's run record; the
    record gets ``model``, ``recipe``, ``fold``, ``test_set``, ``status``, ``error`` and ``checkpoint`` added.
    A failed set becomes an error record and the other sets still run."""
    records.mkdir(parents=True, exist_ok=True)
    out = []
    for name, test_dir in test_sets.items():
        record_path = records / f"{name}.json"
        record_path.unlink(missing_ok=True)
        status, error = "ok", None
        try:
            test_set(name, test_dir, record_path)
        except (Exception, SystemExit) as err:
            status, error = "error", f"{type(err).__name__}: {err}"
            traceback.print_exc()
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if status == "ok" and not record.get("test"):
            status, error = "error", "the test finished but recorded no result"
        record.update({"model": run.model, "recipe": record.get("recipe") or run.recipe, "fold": run.fold,
                       "test_set": name, "status": status, "error": error, "checkpoint": str(checkpoint)})
        record_path.write_text(json.dumps(record, indent=2, default=str))
        out.append(record)
    return out


def test_checkpoint(sweep: Sweep, run: Run, checkpoint: Path, test_sets: dict[str, Path], records: Path) -> list[dict]:
    """``segresmamba test`` of ``checkpoint`` on each test set with the run's own settings; one record per
    set (``records/<set>.json``, with ``test_set``, ``status`` and ``error`` added)."""
    from segresmamba.cli import main as cli_main

    config_file = resolve(sweep.runs_dir) / sweep.name / run.path() / "run.yaml"
    base = run_command(sweep, run, config_file)
    args = ["test", *base[base.index("fit") + 1:]]

    def test_set(name: str, test_dir: Path, record_path: Path) -> None:
        cli_main([
            *args, "--data.init_args.test_dir", str(test_dir), "--ckpt_path", str(checkpoint),
            "--run_record", str(record_path), "--trainer.logger.init_args.name", f"robustness_{name}",
            "--trainer.enable_progress_bar", "false",
        ])

    return _record_each_set(run, checkpoint, test_sets, records, test_set)


def nnunetv2_on_test_sets(
    run: Run, fit_record: dict, datamodule, test_sets: dict[str, Path], records: Path, prediction_root: Path
) -> list[dict]:
    """nnU-Net's own prediction (``nnUNetPredictor``) of each test set from the model folder of an
    ``nnunetv2`` run's fit record (``nnunet.model_folder``, its final checkpoint of our fold, the run's
    nnU-Net settings), masks in ``prediction_root/<set>/``, scored in each scan's own space as the run
    itself was (:func:`segresmamba.bench.nnunetv2.score_predictions`); one record per set
    (``records/<set>.json`` and ``<set>_test_cases.csv``, as :func:`test_checkpoint` writes them)."""
    nnunet = fit_record.get("nnunet") or {}
    model_folder, nnunet_fold = nnunet.get("model_folder"), (nnunet.get("dataset") or {}).get("nnunet_fold")
    if not model_folder or nnunet_fold is None:
        raise ValueError(f"{run.text()}: its fit record names no nnU-Net model folder and fold (nnunet.model_folder, nnunet.dataset.nnunet_fold)")
    model_folder = Path(model_folder)
    checkpoint = model_folder / f"fold_{nnunet_fold}" / "checkpoint_final.pth"
    settings = external.NNUNetSettings.from_dict({k: v for k, v in (fit_record.get("recipe_settings") or {}).items() if k != "name"})

    def test_set(name: str, test_dir: Path, record_path: Path) -> None:
        device = settings.torch_device()
        cases = external.cases_in_test_dir(test_dir)
        prediction_dir = prediction_root / name
        if prediction_dir.exists():
            shutil.rmtree(prediction_dir)
        t0 = time.perf_counter()
        external.predict_cases(model_folder, nnunet_fold, cases, prediction_dir, settings, device)
        test, rows = external.score_predictions(prediction_dir, cases, datamodule)
        version = external.require_nnunetv2()
        external.write_record({
            "model": run.model, "recipe": external.RECIPE, "recipe_settings": fit_record.get("recipe_settings"),
            "reported_checkpoint": "last", "data": datamodule.describe(), "provenance": external.nnunet_provenance(device, version),
            "test": {**test, "ckpt_path": str(checkpoint), "reported_checkpoint": "last", "eval_space": "original",
                     "num_cases": len(cases), "test_dir": str(test_dir), "rows": rows},
            "nnunet": {"version": version, "model_folder": str(model_folder), "predictions": str(prediction_dir),
                       "predict_and_score_s": time.perf_counter() - t0},
        }, record_path)

    return _record_each_set(run, checkpoint, test_sets, records, test_set)


# -- the table -------------------------------------------------------------------------------------


def _set_rows(records: Sequence[dict]) -> pd.DataFrame:
    rows = []
    for rec in records:
        test, prov = rec.get("test") or {}, rec.get("provenance") or {}
        rows.append({
            "model": rec["model"], "recipe": rec["recipe"], "test_set": rec["test_set"], "status": rec.get("status", "ok"),
            "dice": test.get("test/dice_mean"), "hd95_mm": test.get("test/hd95_mean"),
            "reported_checkpoint": test.get("reported_checkpoint", rec.get("reported_checkpoint")),
            "device": prov.get("device"), "precision": prov.get("precision"), "git_sha": prov.get("git_sha"),
            "torch": (prov.get("versions") or {}).get("torch"), "monai": (prov.get("versions") or {}).get("monai"),
            "error": rec.get("error"),
        })
    sets = pd.DataFrame(rows)
    for col in ("dice", "hd95_mm"):
        sets[col] = pd.to_numeric(sets[col], errors="coerce")
    return sets


def robustness_table(records: Sequence[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per model and recipe, one row per model, recipe and test set) from test-set records.

    A record is a run record (``metrics.json`` form: ``test`` with ``test/dice_mean`` and optionally
    ``test/hd95_mean``, ``provenance``) with ``model``, ``recipe``, ``test_set`` (``clean`` or a shift
    name) and ``status``. Per model and recipe: ``clean_dice``, ``dice_<shift>`` for each shift,
    ``shifted_dice`` (mean over the shifted sets), ``ratio`` (= shifted / clean), ``ratio_<shift>``, the
    ``worst_shift``, ``clean_hd95_mm`` and ``shifted_hd95_mm``; a failed set counts as missing.
    """
    if not records:
        raise ValueError("no test-set records to tabulate")
    sets = _set_rows(records)
    ok = sets[sets.status == "ok"]
    shift_names = list(dict.fromkeys(s for s in sets.test_set if s != CLEAN))
    rows = []
    for (model, recipe), group in sets.groupby(["model", "recipe"], sort=False):
        good = ok[(ok.model == model) & (ok.recipe == recipe)].set_index("test_set")
        clean = good.dice.get(CLEAN, np.nan)
        row: dict[str, Any] = {"model": model, "recipe": recipe, "clean_dice": clean}
        shifted = {s: good.dice.get(s, np.nan) for s in shift_names}
        row.update({f"dice_{s}": v for s, v in shifted.items()})
        values = pd.Series(shifted, dtype=float)
        row["shifted_dice"] = values.mean() if values.notna().any() else np.nan
        row["ratio"] = row["shifted_dice"] / clean if clean and not np.isnan(clean) else np.nan
        row.update({f"ratio_{s}": v / clean if clean and not np.isnan(clean) else np.nan for s, v in shifted.items()})
        row["worst_shift"] = values.idxmin() if values.notna().any() else None
        hd = good.hd95_mm.drop(CLEAN, errors="ignore")
        row["clean_hd95_mm"] = good.hd95_mm.get(CLEAN, np.nan)
        row["shifted_hd95_mm"] = hd.mean() if hd.notna().any() else np.nan
        row["failed_sets"] = int((group.status != "ok").sum())
        for col in ("reported_checkpoint", "device", "precision", "git_sha", "torch", "monai"):
            row[col] = ", ".join(sorted({str(v) for v in group[col].dropna()}))
        row["data"] = DATA_TEXT
        rows.append(row)
    return pd.DataFrame(rows), sets


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def write_outputs(table: pd.DataFrame, sets: pd.DataFrame, out_dir: Path, protocol: str, set_facts: dict | None = None) -> list[Path]:
    """``robustness.csv``, ``robustness_sets.csv``, ``robustness.md`` and ``robustness.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shift_names = [c.removeprefix("dice_") for c in table.columns if c.startswith("dice_")]
    table.to_csv(out_dir / "robustness.csv", index=False)
    sets.to_csv(out_dir / "robustness_sets.csv", index=False)
    recipes = ", ".join(dict.fromkeys(table.recipe))
    first = lambda col: "; ".join(v for v in dict.fromkeys(table[col]) if v) or "?"  # noqa: E731
    lines = [
        f"# Robustness to acquisition shifts: {DATA_TEXT}, recipes {recipes}",
        "",
        f"Protocol: {protocol}. Device: {first('device')}. Precision: {first('precision')}. "
        f"torch {first('torch')}, MONAI {first('monai')}. git {first('git_sha')}.",
        f"Data: {DATA_TEXT}; trained on the template's other slabs, tested on the held-out slab as stored (clean) "
        f"and after each acquisition shift ({', '.join(shift_names)}), applied once with a fixed seed. "
        f"Checkpoint: {first('reported_checkpoint')} (final weights; none chosen on a test score). "
        "Dice = mean over CSF/other, GM, WM; ratio = mean shifted Dice / clean Dice.",
        "",
        "| model | recipe | clean Dice | " + " | ".join(shift_names) + " | shifted Dice | ratio | worst shift | HD95 clean (mm) | HD95 shifted (mm) |",
        "|---|---|---:|" + "---:|" * len(shift_names) + "---:|---:|---|---:|---:|",
    ]
    for r in table.itertuples():
        cells = [_fmt(getattr(r, f"dice_{s}")) for s in shift_names]
        lines.append(
            f"| {r.model} | {r.recipe} | {_fmt(r.clean_dice)} | " + " | ".join(cells)
            + f" | {_fmt(r.shifted_dice)} | {_fmt(r.ratio, 2)} | {r.worst_shift or '–'} | {_fmt(r.clean_hd95_mm, 1)} | {_fmt(r.shifted_hd95_mm, 1)} |"
        )
    if set_facts:
        lines += ["", "| test set | what it mimics | shape | voxel (mm) | orientation |", "|---|---|---|---|---|"]
        for name, f in set_facts.items():
            lines.append(f"| {name} | {f['mimics']} | {'x'.join(map(str, f['shape']))} | {'x'.join(f'{v:g}' for v in f['voxel_mm'])} | {f['orientation']} |")
    failed = sets[sets.status != "ok"]
    if len(failed):
        lines += ["", "Failed test sets:", ""] + [f"- {f.model} [{f.recipe}] {f.test_set}: {f.error}" for f in failed.itertuples()]
    (out_dir / "robustness.md").write_text("\n".join(lines) + "\n")
    plot_table(table, out_dir / "robustness.png", protocol)
    return [out_dir / n for n in ("robustness.csv", "robustness_sets.csv", "robustness.md", "robustness.png")]


def plot_table(table: pd.DataFrame, path: Path, protocol: str) -> None:
    """Dice per test set, one bar per model and recipe, the run's provenance and checkpoint in the title
    (``table``: :func:`robustness_table`'s first frame, or ``robustness.csv`` read back)."""
    shift_names = [c.removeprefix("dice_") for c in table.columns if c.startswith("dice_")]
    recipes = ", ".join(dict.fromkeys(table.recipe))
    first = lambda col: "; ".join(str(v) for v in dict.fromkeys(table[col].dropna()) if v) or "?"  # noqa: E731
    names = [CLEAN, *shift_names]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(names) + 2), 4.4))
    width = 0.8 / max(1, len(table))
    for i, r in enumerate(table.itertuples()):
        values = [r.clean_dice] + [getattr(r, f"dice_{s}") for s in shift_names]
        ax.bar(np.arange(len(names)) + (i - (len(table) - 1) / 2) * width, values, width, label=f"{r.model} [{r.recipe}]")
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean Dice (CSF/other, GM, WM)")
    ax.legend(fontsize=7, ncol=2)
    title = (f"Robustness, {DATA_TEXT}, recipes {recipes}: {first('device')} · {first('precision')} · "
             f"{protocol} · checkpoint {first('reported_checkpoint')} (final weights) · git {first('git_sha')[:10]}")
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- everything ------------------------------------------------------------------------------------


def card_of(sweep: Sweep) -> str:
    """``cpu`` for a CPU sweep, else the GPU's name as a folder name (``nvidia-h200``)."""
    if not sweep.uses_gpu():
        return "cpu"
    import torch

    from segresmamba.bench.efficiency import card_slug

    return card_slug(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu"


def run_robustness(
    config: str | Path,
    *,
    out: str | Path | None = None,
    models: Sequence[str] | None = None,
    recipes: Sequence[str] | None = None,
    gpus: str | Sequence[str] | None = None,
    runs_dir: str | Path | None = None,
    verbose: bool = False,
) -> pd.DataFrame:
    """Write the test sets, train every model x recipe (skipping finished runs), test each final checkpoint
    on every set (skipping runs already tested after their fit) and write the table of every tested run in
    the results folder, so recipes or models run in separate invocations end up in one table; return it.
    ``out`` replaces the config's results folder (the card is appended)."""
    sweep, shifts, seed = load_robustness(config, runs_dir=str(runs_dir) if runs_dir else None)
    if models:
        sweep.models = list(models)
    if recipes:
        sweep.recipes = list(recipes)
    sweep.check()
    result_dir = resolve(out or sweep.out) / card_of(sweep)
    sweep.out = str(result_dir / "runs")
    runs_root = resolve(sweep.runs_dir) / sweep.name
    datamodule = instantiate_datamodule(sweep.data_settings())
    t0 = time.perf_counter()
    test_sets = write_test_sets(*held_out_slab(datamodule), runs_root / "test_sets", shifts, seed)
    print(f"test sets ({time.perf_counter() - t0:.1f} s): {', '.join(test_sets)} in {runs_root / 'test_sets'}", flush=True)
    trained = {(r["recipe"], r["model"], r["fold"]) for r in run_sweep(sweep, gpus=gpus, verbose=verbose)}
    for run in sweep.runs():
        fit_path = result_dir / "runs" / run.path() / "metrics.json"
        fit_record = json.loads(fit_path.read_text()) if fit_path.is_file() else {}
        if fit_record.get("status") != "ok":
            print(f"{run.text()}: no finished fit, its test sets are left out", flush=True)
            continue
        tested = result_dir / "runs" / run.path() / "test_sets"
        if (run.recipe, run.model, run.fold) not in trained and all((tested / f"{n}.json").is_file() for n in test_sets):
            print(f"{run.text()}: already tested on every set, kept", flush=True)
            continue
        t0 = time.perf_counter()
        if run.model in external.EXTERNAL_MODELS:
            nnunetv2_on_test_sets(run, fit_record, datamodule, test_sets, tested, runs_root / run.path() / "robustness_predictions")
        else:
            test_checkpoint(sweep, run, last_checkpoint(runs_root / run.path()), test_sets, tested)
        print(f"{run.text()}: tested on {len(test_sets)} sets in {time.perf_counter() - t0:.0f} s", flush=True)
    # every tested run in the results folder, also those of earlier invocations (e.g. one recipe at a time)
    records = [json.loads(p.read_text()) for p in sorted((result_dir / "runs").glob("*/*/fold*/test_sets/*.json"))]
    if not records:
        raise ValueError(f"no run of {config} finished; see the fit logs under {runs_root}")
    table, sets = robustness_table(records)
    set_facts = json.loads((runs_root / "test_sets" / "sets.json").read_text())
    for path in write_outputs(table, sets, result_dir, sweep.protocol, set_facts):
        print(f"wrote {path}", flush=True)
    print((result_dir / "robustness.md").read_text(), flush=True)
    return table


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Robustness of trained nets to acquisition shifts (see the module docstring).", allow_abbrev=False)
    p.add_argument("config", help="robustness file, e.g. configs/bench/robustness_quick.yaml")
    p.add_argument("--out", default=None, help="results folder (default: the file's `out`; the card is appended)")
    p.add_argument("--models", nargs="+", default=None, help="subset of the file's models")
    p.add_argument("--recipes", nargs="+", default=None, help="recipes to run (default: the file's `recipes`)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids to spread the fits over (default: every visible GPU)")
    p.add_argument("--runs-dir", default=None, help="where logs, checkpoints and the test sets go (default: the file's runs_dir)")
    p.add_argument("--verbose", action="store_true", help="show each fit's Lightning output instead of logging it")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error too (or SEGRESMAMBA_DEBUG=1)")
    args = p.parse_args(argv)
    try:
        run_robustness(args.config, out=args.out, models=args.models, recipes=args.recipes, gpus=args.gpus,
                       runs_dir=args.runs_dir, verbose=args.verbose)
    except SweepInterrupted as stop:
        return 128 + stop.signum
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m segresmamba.bench.robustness``: a bad file or setting is one line naming it (exit status 2),
    a signal during the fits stops them as it stops a sweep (128 + the signal number)."""
    return command_line(_main, argv, describe=lambda err: str(err) if isinstance(err, ValueError) else None)


if __name__ == "__main__":
    raise SystemExit(main())
