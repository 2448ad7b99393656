"""Robustness benchmark: the test sets it writes, its table from hand-made records, its config files, and
nnU-Net v2's branch (its predictor replaced by one that writes known masks)."""

import json
import os
import subprocess
import sys
import time
import types

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from segresmamba.bench import robustness
from segresmamba.bench.robustness import (
    CLEAN,
    DATA_TEXT,
    held_out_slab,
    load_robustness,
    nnunetv2_on_test_sets,
    robustness_table,
    write_outputs,
    write_test_sets,
)
from segresmamba.bench.sweep import Run
from segresmamba.data import MNI152TissueDataModule
from segresmamba.data.external import pair_test_dir

PROV = {"device": "NVIDIA H200", "precision": "bf16-mixed", "git_sha": "abc1234def", "versions": {"torch": "2.9", "monai": "1.5"}}


def record(model, recipe, test_set, dice, hd95=None, status="ok"):
    test = {"test/dice_mean": dice, "reported_checkpoint": "last"}
    if hd95 is not None:
        test["test/hd95_mean"] = hd95
    return {"model": model, "recipe": recipe, "test_set": test_set, "status": status, "provenance": PROV,
            "test": test if status == "ok" else {}, "error": None if status == "ok" else "boom"}


def test_table_from_records(tmp_path):
    records = [
        record("nnunet", "nnunet", CLEAN, 0.9, 2.0), record("nnunet", "nnunet", "noise", 0.85, 3.0),
        record("nnunet", "nnunet", "all", 0.81, 5.0),
        record("unet", "paper", CLEAN, 0.8), record("unet", "paper", "noise", 0.2), record("unet", "paper", "all", None, status="error"),
    ]
    table, sets = robustness_table(records)
    assert list(table.model) == ["nnunet", "unet"] and list(table.recipe) == ["nnunet", "paper"]
    nn = table.iloc[0]
    assert nn.clean_dice == 0.9 and nn.dice_noise == 0.85 and nn.dice_all == 0.81
    assert np.isclose(nn.shifted_dice, 0.83) and np.isclose(nn.ratio, 0.83 / 0.9) and np.isclose(nn.ratio_all, 0.9)
    assert nn.worst_shift == "all" and nn.clean_hd95_mm == 2.0 and nn.shifted_hd95_mm == 4.0
    assert nn.device == "NVIDIA H200" and nn.data == DATA_TEXT and nn.reported_checkpoint == "last"
    un = table.iloc[1]
    assert np.isnan(un.dice_all) and un.shifted_dice == 0.2 and np.isclose(un.ratio, 0.25) and un.failed_sets == 1
    assert np.isnan(un.clean_hd95_mm)
    assert len(sets) == 6 and set(sets.columns) >= {"model", "recipe", "test_set", "dice", "hd95_mm", "git_sha"}

    written = write_outputs(table, sets, tmp_path, "gpu: 8 x 250", {CLEAN: {"mimics": "as stored", "shape": [9, 9, 9], "voxel_mm": [2, 2, 2], "orientation": "RAS"}})
    assert all(p.is_file() for p in written)
    md = (tmp_path / "robustness.md").read_text()
    assert "recipes nnunet, paper" in md and DATA_TEXT in md and "NVIDIA H200" in md and "git abc1234def" in md
    assert "| nnunet | nnunet | 0.900 | 0.850 | 0.810 | 0.830 | 0.92 | all | 2.0 | 4.0 |" in md
    assert "- unet [paper] all: boom" in md
    assert pd.read_csv(tmp_path / "robustness.csv").recipe.tolist() == ["nnunet", "paper"]
    with pytest.raises(ValueError, match="no test-set records"):
        robustness_table([])


def test_writes_clean_and_shifted_test_sets(tmp_path):
    dm = MNI152TissueDataModule(resolution=2, fold=1, patch_size=32)
    image, label, case_id = held_out_slab(dm)
    v0, v1 = dm.slabs["val"]
    assert image.shape[dm.axis_index] == v1 - v0 and case_id == dm.items("test")[0]["case_id"]
    # the true affine: the slab's first voxel sits where the template's voxel v0 sits
    assert np.allclose(image.affine[:3, 3], dm_template_corner(dm, v0))
    sets = write_test_sets(image, label, case_id, tmp_path, ["orientation", "field_of_view"], seed=0)
    assert list(sets) == [CLEAN, "orientation", "field_of_view"]
    for name, folder in sets.items():
        (files, label_path), = pair_test_dir(folder).values()
        assert files[0].name == f"{case_id}_0000.nii.gz"
    facts = json.loads((tmp_path / "sets.json").read_text())
    assert facts["orientation"]["orientation"] == "LSA" and facts[CLEAN]["orientation"] == "RAS"
    padded = nib.load(str(sets["field_of_view"] / "imagesTs" / f"{case_id}_0000.nii.gz"))
    assert all(a > b for a, b in zip(padded.shape, image.shape))
    with pytest.raises(ValueError, match="unknown shift"):
        write_test_sets(image, label, case_id, tmp_path, ["blur"], seed=0)


def dm_template_corner(dm, v0):
    from segresmamba.data.mni152 import mni152_tissue_volumes

    affine = mni152_tissue_volumes(dm.resolution)[2]
    corner = np.zeros(3)
    corner[dm.axis_index] = v0
    return nib.affines.apply_affine(affine, corner)


@pytest.mark.parametrize("profile", ["quick", "gpu"], ids=["cpu_profile", "device_profile"])
def test_config_files_load(profile, tmp_path):
    sweep, shifts, seed = load_robustness(f"configs/bench/robustness_{profile}.yaml", runs_dir=str(tmp_path))
    assert sweep.dataset == "mni152_tissue" and set(sweep.recipes) == {"paper", "nnunet"} and len(sweep.models) == 2
    assert shifts[-1] == "all" and len(shifts) == 7 and seed == 0
    assert "configs/callbacks/keep_last.yaml" in sweep.config  # the final weights are what the shifted sets test
    assert (tmp_path / sweep.name / "sweep.yaml").is_file()


def test_bad_config(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\ndataset: brats\n")
    with pytest.raises(ValueError, match="robustness: "):
        load_robustness(bad)
    bad.write_text("name: x\ndataset: mni152_tissue\nrobustness: {shifts: [blur]}\n")
    with pytest.raises(ValueError, match="robustness.shifts"):
        load_robustness(bad)


@pytest.mark.slow
def test_quick_profile_end_to_end(tmp_path):
    """One net, one recipe, two shifts, a few steps: fit, then the final checkpoint on every set."""
    cfg = tmp_path / "r.yaml"
    text = open("configs/bench/robustness_quick.yaml").read()
    cfg.write_text(text.replace("shifts: [resolution, orientation, field_of_view, bias_field, gamma, noise, all]", "shifts: [orientation, noise]")
                   .replace("max_epochs: 2, limit_train_batches: 20", "max_epochs: 1, limit_train_batches: 2"))
    proc = subprocess.run(
        [sys.executable, "-m", "segresmamba.bench.robustness", str(cfg), "--models", "unet", "--recipes", "paper",
         "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "results")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "cpu" / "robustness.csv")
    assert table.model.tolist() == ["unet"] and table.recipe.tolist() == ["paper"]
    assert table.clean_dice.notna().all() and table.dice_orientation.notna().all() and table.dice_noise.notna().all()
    # the orientation shift changes only how the file stores the same voxels: the same Dice as clean
    assert np.isclose(table.dice_orientation[0], table.clean_dice[0], atol=1e-4)
    assert (tmp_path / "results" / "cpu" / "robustness.png").is_file()


# -- nnU-Net v2 --------------------------------------------------------------------------------------


class KnownMaskPredictor:
    """Stands in for nnU-Net's ``nnUNetPredictor``: writes each case's stored label as its mask, with the
    classes in ``drop`` (per output folder name) set to background; records how it was called."""

    calls: list = []
    drop: dict[str, int] = {}

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def initialize_from_trained_model_folder(self, folder, use_folds, checkpoint_name):
        KnownMaskPredictor.calls.append({"folder": folder, "folds": use_folds, "checkpoint": checkpoint_name, **self.kwargs})

    def predict_from_files(self, images, outputs, save_probabilities, overwrite, num_processes_preprocessing,
                           num_processes_segmentation_export):
        for files, out in zip(images, outputs):
            image = os.path.abspath(files[0])
            test_dir, case_id = os.path.dirname(os.path.dirname(image)), os.path.basename(image).removesuffix("_0000.nii.gz")
            label = nib.load(os.path.join(test_dir, "labelsTs", f"{case_id}.nii.gz"))
            mask = np.asarray(label.dataobj).astype(np.uint8)
            mask[mask == KnownMaskPredictor.drop.get(os.path.basename(os.path.dirname(out)), -1)] = 0
            os.makedirs(os.path.dirname(out), exist_ok=True)
            nib.save(nib.Nifti1Image(mask, label.affine), out + ".nii.gz")


@pytest.fixture
def known_masks(monkeypatch):
    """nnU-Net's predictor module replaced by :class:`KnownMaskPredictor` (needs the bare nnunetv2 package)."""
    pytest.importorskip("nnunetv2")
    module = types.ModuleType("nnunetv2.inference.predict_from_raw_data")
    module.nnUNetPredictor = KnownMaskPredictor
    monkeypatch.setitem(sys.modules, "nnunetv2.inference.predict_from_raw_data", module)
    monkeypatch.setattr(KnownMaskPredictor, "calls", [])
    monkeypatch.setattr(KnownMaskPredictor, "drop", {"noise": 3})  # WM missed on the noisy set
    return KnownMaskPredictor


def nnunetv2_fit_record(model_folder, fold=0):
    """What a finished nnunetv2 sweep run records of its training (the keys the robustness test reads)."""
    (model_folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    (model_folder / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"")
    settings = {"name": "nnunetv2", "device": "cpu", "tile_step_size": 0.75, "use_mirroring": False, "preprocessing_processes": 1}
    return {"model": "nnunetv2", "recipe": "nnunetv2", "status": "ok", "recipe_settings": settings,
            "nnunet": {"model_folder": str(model_folder), "dataset": {"nnunet_fold": fold}}, "test": {"test/dice_mean": 0.5}}


@pytest.fixture(scope="module")
def slab_sets(tmp_path_factory):
    """The data module and its clean, orientation and noise test sets."""
    dm = MNI152TissueDataModule(resolution=2, fold=0, patch_size=32)
    root = tmp_path_factory.mktemp("sets")
    return dm, write_test_sets(*held_out_slab(dm), root, ["orientation", "noise"], seed=0)


def test_nnunetv2_predicts_and_scores_each_set(known_masks, slab_sets, tmp_path):
    """nnU-Net's predictor on each set from the recorded model folder, scored in each scan's own space into
    the records the CLI path writes; the table shows nnunetv2 under its own recipe beside the others."""
    dm, sets = slab_sets
    run = Run("nnunetv2", "nnunetv2", 0)
    fit = nnunetv2_fit_record(tmp_path / "nnUNet_results" / "Dataset500_mni152_tissue" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    records = tmp_path / "runs" / "nnunetv2" / "nnunetv2" / "fold0" / "test_sets"
    out = nnunetv2_on_test_sets(run, fit, dm, sets, records, tmp_path / "predictions")
    assert [r["test_set"] for r in out] == [CLEAN, "orientation", "noise"] and {r["status"] for r in out} == {"ok"}
    call = known_masks.calls[0]
    assert call["folder"] == fit["nnunet"]["model_folder"] and call["folds"] == (0,) and call["checkpoint"] == "checkpoint_final.pth"
    assert call["tile_step_size"] == 0.75 and call["use_mirroring"] is False and call["device"].type == "cpu"
    assert len(known_masks.calls) == 3
    clean = json.loads((records / "clean.json").read_text())
    assert (clean["model"], clean["recipe"], clean["fold"]) == ("nnunetv2", "nnunetv2", 0)
    assert clean["test"]["test/dice_mean"] == pytest.approx(1.0) and clean["test"]["test/hd95_mean"] == pytest.approx(0.0)
    assert clean["test"]["reported_checkpoint"] == "last" and clean["test"]["eval_space"] == "original"
    assert clean["provenance"]["versions"]["nnunetv2"] and clean["provenance"]["precision"] == "32 (nnU-Net on CPU)"
    # the label stored in LSA order is predicted on its own grid: the same score as clean
    assert json.loads((records / "orientation.json").read_text())["test"]["test/dice_mean"] == pytest.approx(1.0)
    noise = pd.read_csv(records / "noise_test_cases.csv")
    assert noise.set_index("class").dice.to_dict() == pytest.approx({"CSF/other": 1.0, "GM": 1.0, "WM": 0.0})
    assert (tmp_path / "predictions" / "noise").is_dir()

    others = [record("nnunet", "nnunet", s, 0.8) for s in (CLEAN, "orientation", "noise")]
    table, _ = robustness_table([*others, *(json.loads(p.read_text()) for p in sorted(records.glob("*.json")))])
    assert table.model.tolist() == ["nnunet", "nnunetv2"] and table.recipe.tolist() == ["nnunet", "nnunetv2"]
    row = table.set_index("model").loc["nnunetv2"]
    assert row.clean_dice == pytest.approx(1.0) and row.dice_orientation == pytest.approx(1.0)
    assert row.dice_noise == pytest.approx(2 / 3) and row.worst_shift == "noise" and row.reported_checkpoint == "last"
    write_outputs(table, _, tmp_path / "table", "test")
    assert "| nnunetv2 | nnunetv2 | 1.000 | 1.000 | 0.667 | 0.833 | 0.83 | noise |" in (tmp_path / "table" / "robustness.md").read_text()


def test_nnunetv2_without_its_model(known_masks, slab_sets, tmp_path):
    """A fit record naming no model folder stops with a message; a removed checkpoint makes error rows."""
    dm, sets = slab_sets
    run = Run("nnunetv2", "nnunetv2", 0)
    with pytest.raises(ValueError, match="names no nnU-Net model folder"):
        nnunetv2_on_test_sets(run, {"status": "ok"}, dm, sets, tmp_path / "records", tmp_path / "predictions")
    fit = nnunetv2_fit_record(tmp_path / "model")
    (tmp_path / "model" / "fold_0" / "checkpoint_final.pth").unlink()
    out = nnunetv2_on_test_sets(run, fit, dm, sets, tmp_path / "records", tmp_path / "predictions")
    assert {r["status"] for r in out} == {"error"} and "no nnU-Net checkpoint" in out[0]["error"]
    assert not known_masks.calls


def test_run_robustness_tests_the_sweeps_nnunetv2_run(known_masks, tmp_path, monkeypatch):
    """``--models nnunetv2``: the sweep's own run (recipe nnunetv2) is tested with nnU-Net's predictor from
    its fit record, not looked up as a last.ckpt, and lands in the table."""
    cfg = tmp_path / "r.yaml"
    text = open("configs/bench/robustness_quick.yaml").read()
    cfg.write_text(text.replace("shifts: [resolution, orientation, field_of_view, bias_field, gamma, noise, all]", "shifts: [noise]"))
    fit = tmp_path / "results" / "cpu" / "runs" / "nnunetv2" / "nnunetv2" / "fold0" / "metrics.json"
    fit.parent.mkdir(parents=True)
    fit.write_text(json.dumps(nnunetv2_fit_record(tmp_path / "runs" / "model")))
    trained = []
    monkeypatch.setattr(robustness, "run_sweep", lambda sweep, **kw: trained.append(sweep.runs()) or [])
    t0 = time.perf_counter()
    table = robustness.run_robustness(cfg, out=tmp_path / "results", models=["nnunetv2"], runs_dir=tmp_path / "runs")
    assert trained == [[Run("nnunetv2", "nnunetv2", 0)]]
    assert table.model.tolist() == ["nnunetv2"] and table.recipe.tolist() == ["nnunetv2"]
    assert table.clean_dice[0] == pytest.approx(1.0) and table.dice_noise[0] == pytest.approx(2 / 3)
    assert (fit.parent / "test_sets" / "noise_test_cases.csv").is_file()
    assert (tmp_path / "runs" / "robustness-quick" / "nnunetv2" / "nnunetv2" / "fold0" / "robustness_predictions" / "clean").is_dir()
    # a second call keeps the sets already tested
    robustness.run_robustness(cfg, out=tmp_path / "results", models=["nnunetv2"], runs_dir=tmp_path / "runs")
    assert len(known_masks.calls) == 2
    assert time.perf_counter() - t0 < 60
