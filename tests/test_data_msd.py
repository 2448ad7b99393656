"""MSD adapters on phantoms: Task09 Spleen and a generic multi-modal (4D) Decathlon task."""

import json
import shutil

import pytest
import torch

from segresmamba.data import MSDDataModule, SpleenDataModule
from segresmamba.data.write_phantoms import write_msd_phantom, write_spleen_phantom


@pytest.fixture(scope="module")
def spleen_root(tmp_path_factory):
    return write_spleen_phantom(tmp_path_factory.mktemp("msd") / "Task09_Spleen", cases=10, size=32, seed=0, test_cases=2)


def test_spleen(spleen_root, tmp_path):
    dm = SpleenDataModule(root=str(spleen_root), num_val=3, patch_size=16, split_file=str(tmp_path / "s.json"))
    assert (dm.in_channels, dm.out_channels, dm.class_names, dm.task) == (1, 2, ["spleen"], "multiclass")
    assert dm.name == "msd_spleen" and dm.provenance == "synthetic"
    summary = dm.validate()
    assert summary["num_train"] == 7 and summary["num_val"] == 3 and summary["test_is_val"]
    assert all(i.startswith("spleen_") and int(i[7:]) <= 10 for i in dm.case_ids("train"))  # imagesTs unused
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["label"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert set(val["label"].unique().tolist()) == {0, 1} and val["image"].shape[2:] == (18, 18, 16)


def test_spleen_kfold_and_determinism(spleen_root, tmp_path):
    a = SpleenDataModule(root=str(spleen_root), split="kfold", fold=2, split_file=str(tmp_path / "a.json"))
    b = SpleenDataModule(root=str(spleen_root), split="kfold", fold=2, split_file=str(tmp_path / "b.json"))
    assert a.case_ids("val") == b.case_ids("val") and len(a.case_ids("val")) == 2 and len(a.case_ids("train")) == 8


def test_apple_double_entries_are_ignored(spleen_root, tmp_path):
    root = tmp_path / "Task09_Spleen"
    shutil.copytree(spleen_root, root, ignore=shutil.ignore_patterns("splits"))
    (root / "imagesTr" / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "labelsTr" / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/._spleen_1.nii.gz", "label": "./labelsTr/._spleen_1.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))
    dm = SpleenDataModule(root=str(root), num_val=2)
    assert dm.validate()["num_train"] == 8


def test_spleen_rejects_a_multimodal_json(tmp_path):
    root = write_msd_phantom(tmp_path / "mm", cases=3, size=16, modalities=("CT", "MR"))
    with pytest.raises(ValueError, match="Task09 Spleen has 1"):
        SpleenDataModule(root=str(root))


def test_generic_multimodal_4d(tmp_path):
    root = write_msd_phantom(tmp_path / "Task99", cases=4, size=24, modalities=("CT", "MR", "MR"), task_name="Phantom")
    dm = MSDDataModule(root=str(root), num_val=1, patch_size=16, num_samples=2)
    assert (dm.in_channels, dm.out_channels, dm.name) == (3, 2, "msd_phantom")
    assert dm.intensity_window is None  # not all CT: z-score
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16, 16)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[:2] == (1, 3) and val["label"].shape[1] == 1
    assert dm.describe()["modalities"] == ["CT", "MR", "MR"]


def test_missing_dataset_json(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MSDDataModule(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no dataset.json"):
        MSDDataModule(root=str(tmp_path / "empty"))
