"""Robustness benchmark: the test sets it writes, its table from hand-made records, its config files."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from segresmamba.bench.robustness import (
    CLEAN,
    DATA_TEXT,
    held_out_slab,
    load_robustness,
    robustness_table,
    write_outputs,
    write_test_sets,
)
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
