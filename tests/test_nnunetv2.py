"""nnU-Net v2 as an external baseline: the raw export, the errors before work starts, the record and its
aggregation, and (slow, with nnunetv2 installed) one tiny run end to end on a phantom."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segresmamba.bench import nnunetv2 as nn
from segresmamba.data import BraTS2021DataModule, SpleenDataModule
from segresmamba.data.synthetic import SyntheticBraTSDataModule
from segresmamba.data.write_phantoms import write_brats_phantom, write_spleen_phantom


@pytest.fixture
def spleen(tmp_path):
    root = write_spleen_phantom(tmp_path / "spleen", cases=6, size=24, seed=0)
    return SpleenDataModule(root=str(root), split="kfold", num_folds=3, fold=1, patch_size=16)


def test_export_spleen_layout_and_split(spleen, tmp_path):
    raw = nn.export_raw_dataset(spleen, tmp_path / "nnUNet_raw", dataset_id=7)
    assert raw.name == "Dataset007_msd_spleen" and raw.folder == tmp_path / "nnUNet_raw" / raw.name
    meta = json.loads((raw.folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "spleen": 1}
    assert meta["file_ending"] == ".nii.gz" and "regions_class_order" not in meta
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (raw.folder / "labelsTr").iterdir())
    assert meta["numTraining"] == len(cases) == 6
    assert sorted(p.name for p in (raw.folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    # every fold of the kfold split file, ours at its own index, equal to our split, no leakage
    folds = json.loads((raw.folder / "splits_final.json").read_text())
    assert len(folds) == 3 and raw.nnunet_fold == 1
    assert folds[1] == {"train": spleen.case_ids("train"), "val": spleen.case_ids("val")}
    for fold in folds:
        assert not set(fold["train"]) & set(fold["val"]) and sorted(fold["train"] + fold["val"]) == cases
    # the test cases (= validation here) are linked into imagesTs and scored against the stored labels
    assert [c.case_id for c in raw.test] == spleen.case_ids("test")
    for case in raw.test:
        assert Path(case.images[0]).name == f"{case.case_id}_0000.nii.gz" and Path(case.images[0]).is_symlink()
        assert Path(case.label).resolve() == Path(spleen._cases[case.case_id].label).resolve()


def test_export_brats_channels_and_regions(tmp_path):
    root = write_brats_phantom(tmp_path / "brats", cases=4, size=16, seed=0)
    dm = BraTS2021DataModule(root=str(root), num_folds=2, fold=0, patch_size=16)
    raw = nn.export_raw_dataset(dm, tmp_path / "raw", dataset_id=3)
    meta = json.loads((raw.folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "flair", "1": "t1", "2": "t1ce", "3": "t2"}
    assert meta["labels"]["whole tumor"] == [1, 2, 3] and meta["regions_class_order"] == [2, 1, 3]
    case = dm.case_ids("train")[0]
    names = sorted(p.name for p in (raw.folder / "imagesTr").glob(f"{case}_*"))
    assert names == [f"{case}_{c:04d}.nii.gz" for c in range(4)]
    assert (raw.folder / "imagesTr" / f"{case}_0002.nii.gz").resolve().name == f"{case}_t1ce.nii.gz"
    stored = np.asarray(nib.load(str(dm._cases[case].label)).dataobj)
    written = np.asarray(nib.load(str(raw.folder / "labelsTr" / f"{case}.nii.gz")).dataobj)
    assert 4 in stored and set(np.unique(written)) == set(np.unique(stored)) - {4} | {3}
    assert np.array_equal(written == 3, stored == 4) and raw.region_based


def test_export_in_memory_writes_nifti(tmp_path):
    dm = SyntheticBraTSDataModule(volume_size=16, num_train=2, num_val=1, num_test=1, patch_size=16)
    raw = nn.export_raw_dataset(dm, tmp_path, dataset_id=9)
    folds = json.loads((raw.folder / "splits_final.json").read_text())
    assert folds == [{"train": ["train000", "train001"], "val": ["val000"]}] and raw.nnunet_fold == 0
    test = raw.test[0]
    assert len(test.images) == 4 and np.allclose(nib.load(test.images[0]).affine, np.eye(4))
    assert 4 in np.unique(np.asarray(nib.load(test.label).dataobj))  # test labels as stored


def test_refuses_other_multilabel_tasks(spleen, monkeypatch, tmp_path):
    monkeypatch.setattr(spleen, "task", "multilabel")
    with pytest.raises(ValueError, match="overlapping regions"):
        nn.export_raw_dataset(spleen, tmp_path)


def test_missing_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # `import nnunetv2` raises ImportError
    with pytest.raises(ValueError, match=r'pip install -e "\.\[nnunet\]"'):
        nn.require_nnunetv2()


@pytest.mark.parametrize(
    "raw, match",
    [({"epochs": 0}, "epochs"), ({"device": "tpu"}, "device"), ({"dataset_id": 1000}, "dataset_id"),
     ({"trainer": "not a class"}, "trainer"), ({"learning_rate": 1}, "unknown nnunetv2 setting")],
)
def test_bad_settings(raw, match):
    with pytest.raises(ValueError, match=match):
        nn.NNUNetSettings.from_dict(raw)


def test_energy_settings_from_callbacks():
    stacked = {"trainer": {"callbacks+": [{"class_path": "segresmamba.callbacks.EnergyTracker", "init_args": {"country_iso_code": "FRA"}}]}}
    assert nn.energy_settings(stacked) == {"country_iso_code": "FRA"}
    assert nn.energy_settings({"trainer": {}}) is None


def test_score_record_and_aggregate(spleen, tmp_path):
    """A hand-made prediction (the stored label, one case emptied) scored and recorded as a sweep run."""
    from segresmamba.bench.aggregate import aggregate

    raw = nn.export_raw_dataset(spleen, tmp_path / "raw", dataset_id=5)
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for n, case in enumerate(raw.test):
        label = nib.load(case.label)
        data = np.asarray(label.dataobj) * (n > 0)
        nib.save(nib.Nifti1Image(data.astype(np.uint8), label.affine), str(predictions / f"{case.case_id}.nii.gz"))
    test, rows = nn.score_predictions(predictions, raw.test, spleen)
    assert len(rows) == len(raw.test) and rows[0]["dice"] == 0.0 and rows[1]["dice"] == pytest.approx(1.0)
    assert test["test/dice_mean"] == pytest.approx(0.5) and test["test/dice_spleen"] == pytest.approx(0.5)
    assert rows[1]["hd95_mm"] == 0.0 and rows[0]["hd95_mm"] > 0  # empty prediction: the volume's diagonal

    record = {"model": "nnunetv2", "recipe": "nnunetv2", "reported_checkpoint": "last", "status": "ok", "fold": 1,
              "data": spleen.describe(), "provenance": {"device": "cpu", "git_sha": "abc"},
              "fit": {"epochs": 1, "wall_time_s": 2.0, "peak_memory_allocated_gib": None, "energy": None},
              "test": {**test, "rows": rows}}
    out = tmp_path / "results" / "nnunetv2" / "nnunetv2" / "fold1" / "metrics.json"
    nn.write_record(record, out)
    assert (out.parent / "test_cases.csv").read_text().startswith("case_id,class,dice,hd95_mm,eval_space,spacing_mm")
    summary = aggregate(tmp_path / "results")
    row = summary.iloc[0]
    assert (row.model, row.recipe, row.reported_checkpoint) == ("nnunetv2", "nnunetv2", "last")
    assert row.test_dice_mean_mean == pytest.approx(0.5)
    assert "| nnunetv2 | nnunetv2 | last |" in (tmp_path / "results" / "summary.md").read_text()


@pytest.mark.slow
def test_end_to_end_on_cpu(spleen, tmp_path):
    """Plan, preprocess, one epoch of 2 iterations on a CPU, predict and score: a record with a test Dice."""
    pytest.importorskip("nnunetv2")
    settings = nn.NNUNetSettings(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, device="cpu",
                                 preprocessing_processes=1, augmentation_processes=0, use_mirroring=False)
    saved = dict(os.environ)  # the run sets nnU-Net's variables in this process; a later run must not inherit them
    try:
        nn.set_environment(tmp_path.resolve(), settings)
        t0 = time.perf_counter()
        record = nn.run_nnunetv2(spleen, tmp_path, settings)
        elapsed = time.perf_counter() - t0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "recipe" not in record["data"]
    assert record["model"] == record["recipe"] == "nnunetv2" and record["fit"]["epochs"] == 1
    assert 0.0 <= record["test"]["test/dice_mean"] <= 1.0 and len(record["test"]["rows"]) == len(spleen.case_ids("test"))
    plan = record["nnunet"]["plan"]
    assert plan["configuration"] == "3d_fullres" and len(plan["patch_size"]) == 3 and plan["normalization"] == ["CTNormalization"]
    assert (tmp_path / "nnUNet_preprocessed" / record["nnunet"]["dataset"]["name"] / "splits_final.json").is_file()
    print(f"nnU-Net CPU smoke run: {elapsed:.0f} s")


def _sweep_file(tmp_path, models, **extra) -> Path:
    import yaml

    sweep = {
        "name": "nnunet-test", "dataset": "spleen", "protocol": "test", "models": models, "folds": [0],
        "recipes": ["paper", "nnunet"], "out": str(tmp_path / "results"), "runs_dir": str(tmp_path / "runs"),
        "config": ["configs/trainer/cpu.yaml", "configs/data/spleen.yaml", "configs/callbacks/energy.yaml"],
        "phantom": {"kind": "spleen", "out": str(tmp_path / "phantom"), "cases": 5, "size": 24, "seed": 0},
        "data": {"init_args": {"patch_size": 16, "num_val": 2, "num_workers": 0, "cache_rate": 0.0}},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_runs_nnunetv2_once_per_fold_under_its_recipe(tmp_path):
    from segresmamba.bench.sweep import Run, Sweep, external_run_files

    sweep = Sweep.load(_sweep_file(tmp_path, ["nnunetv2", "unet"], nnunetv2={"epochs": 1, "device": "cpu"}))
    assert sweep.runs() == [Run("paper", "unet", 0), Run("nnunet", "unet", 0), Run("nnunetv2", "nnunetv2", 0)]
    data = {"overrides": {"root": "/data/spleen"}, "has_fold": True}
    run_dir, record, spec_path, command = external_run_files(sweep, Run("nnunetv2", "nnunetv2", 0), tmp_path / "runs", data)
    spec = json.loads(spec_path.read_text())
    assert command[-3:] == ["-m", "segresmamba.bench.nnunetv2", str(spec_path)] and record == run_dir / "record.json"
    assert spec["data"]["class_path"] == "segresmamba.data.SpleenDataModule"
    assert spec["data"]["init_args"]["root"] == "/data/spleen" and spec["data"]["init_args"]["patch_size"] == 16
    assert spec["settings"]["epochs"] == 1 and spec["energy"] == {"country_iso_code": "DEU"}
    assert spec["work_dir"] == str(run_dir)


def test_sweep_refuses_bad_nnunet_settings(tmp_path):
    from segresmamba.bench.sweep import Sweep

    with pytest.raises(ValueError, match="unknown nnunetv2 setting"):
        Sweep.load(_sweep_file(tmp_path, ["nnunetv2"], nnunetv2={"epoch": 1}))


def test_sweep_stops_before_work_without_the_extra(tmp_path, monkeypatch):
    from segresmamba.bench.sweep import run_sweep

    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[nnunet\]"'):
        run_sweep(_sweep_file(tmp_path, ["nnunetv2"]))
    assert not (tmp_path / "runs" / "nnunet-test" / "nnunetv2").exists()


@pytest.mark.slow
def test_sweep_end_to_end_and_resume(tmp_path):
    """A CPU sweep of nnunetv2 alone: a finished record that aggregates, then skipped on a second call."""
    pytest.importorskip("nnunetv2")
    from segresmamba.bench.aggregate import aggregate
    from segresmamba.bench.sweep import run_sweep

    settings = {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "device": "cpu",
                "preprocessing_processes": 1, "augmentation_processes": 0, "use_mirroring": False}
    path = _sweep_file(tmp_path, ["nnunetv2"], nnunetv2=settings)
    path.write_text(path.read_text().replace("configs/callbacks/energy.yaml", "configs/callbacks/sweep.yaml"))
    (record,) = run_sweep(path)
    assert record["status"] == "ok", record.get("error")
    assert (tmp_path / "results" / "nnunetv2" / "nnunetv2" / "fold0" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "nnunet-test" / "nnunetv2" / "nnunetv2" / "fold0" / "nnUNet_results").is_dir()
    summary = aggregate(tmp_path / "results")
    assert list(summary.model) == ["nnunetv2"] and summary.folds.iloc[0] == 1
    assert run_sweep(path) == []
