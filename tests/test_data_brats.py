"""BraTS 2021 adapter on phantoms written in the real layout."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from segresmamba.data import BraTS2021DataModule
from segresmamba.data.phantoms import BRATS_CHANNELS, PHANTOM_MARKER, brats_like
from segresmamba.data.write_phantoms import write_brats_phantom


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory):
    return write_brats_phantom(tmp_path_factory.mktemp("brats") / "BraTS2021", cases=5, size=24, seed=0)


def _copy(root, tmp_path):
    dst = tmp_path / "BraTS2021"
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("splits"))
    return dst


def test_region_conversion_on_a_hand_built_label(tmp_path):
    """Labels 0/1/2/4 -> [TC, WT, ET] = [{1,4}, {1,2,4}, {4}] through the adapter's evaluation chain."""
    seg = np.zeros((8, 8, 8), dtype=np.uint8)
    seg[1, 1, 1] = 1  # necrosis
    seg[2, 2, 2] = 2  # edema
    seg[3, 3, 3] = 4  # enhancing
    root = tmp_path / "hand"
    for i in range(2):
        case = root / f"BraTS2021_{i:05d}"
        case.mkdir(parents=True)
        for ch in BRATS_CHANNELS:
            nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(case / f"{case.name}_{ch}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(case / f"{case.name}_seg.nii.gz"))
    dm = BraTS2021DataModule(root=str(root), num_folds=2, patch_size=8)
    assert dm.provenance == "real"  # no phantom marker
    item = dm.eval_transforms()(dm.items("val")[0])
    label = item["label"]
    assert label.shape == (3, 8, 8, 8) and label.dtype == torch.float32
    tc, wt, et = label
    assert tc[1, 1, 1] == 1 and wt[1, 1, 1] == 1 and et[1, 1, 1] == 0
    assert tc[2, 2, 2] == 0 and wt[2, 2, 2] == 1 and et[2, 2, 2] == 0
    assert tc[3, 3, 3] == 1 and wt[3, 3, 3] == 1 and et[3, 3, 3] == 1
    assert label.sum() == 1 + 2 + 3 and dm.class_names == ["TC", "WT", "ET"]


def test_adapter_on_phantom(brats_root, tmp_path):
    root = _copy(brats_root, tmp_path)
    dm = BraTS2021DataModule(root=str(root), fold=1, patch_size=16, batch_size=2)
    summary = dm.validate()
    assert dm.provenance == "synthetic" and summary["provenance"] == "synthetic"
    assert (dm.in_channels, dm.out_channels, dm.task) == (4, 3, "multilabel")
    assert summary["num_train"] == 4 and summary["num_val"] == 1 and summary["test_is_val"]
    assert (root / "splits" / "brats2021_kfold5_seed0.json").is_file()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 4, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 3, 16, 16, 16)
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 4, 24, 24, 24) and val["label"].shape == (1, 3, 24, 24, 24)
    # channels stacked in BRATS_CHANNELS order: each matches the generator's channel of that name
    case = val["case_id"][0]
    image, seg = brats_like(24, seed=int(case.split("_")[1]))
    for k in range(4):
        inside = image[k] > 0  # NormalizeIntensity(nonzero=True) leaves zeros alone
        corr = np.corrcoef(val["image"][0, k].numpy()[inside], image[k][inside])[0, 1]
        assert corr > 0.99, (k, corr)
    assert np.array_equal(val["label"][0, 2].numpy() > 0, seg == 4)  # ET


def test_split_is_deterministic_and_covers_every_case(brats_root, tmp_path):
    vals = []
    for fold in range(5):
        dm = BraTS2021DataModule(root=str(brats_root), fold=fold, split_file=str(tmp_path / "s.json"))
        vals += dm.case_ids("val")
        assert not set(dm.case_ids("val")) & set(dm.case_ids("train"))
    assert sorted(vals) == [f"BraTS2021_{i:05d}" for i in range(5)]
    other = BraTS2021DataModule(root=str(brats_root), fold=3, split_file=str(tmp_path / "t.json"))
    other.validate()
    assert json.loads((tmp_path / "s.json").read_text())["folds"] == json.loads((tmp_path / "t.json").read_text())["folds"]
    assert other.case_ids("val") == BraTS2021DataModule(root=str(brats_root), fold=3, split_file=str(tmp_path / "s.json")).case_ids("val")


def test_public_folds_file(brats_root, tmp_path):
    entries = [
        {"fold": f, "image": [f"TrainingData/{c}/{c}_flair.nii.gz"], "label": f"TrainingData/{c}/{c}_seg.nii.gz"}
        for c, f in [("BraTS2021_00000", 0), ("BraTS2021_00001", 0), ("BraTS2021_00002", 1), ("BraTS2021_00003", 1)]
    ]
    folds = tmp_path / "brats21_folds.json"
    folds.write_text(json.dumps({"training": entries}))
    with pytest.warns(UserWarning, match="BraTS2021_00004"):  # on disk, not in the file: unused
        dm = BraTS2021DataModule(root=str(brats_root), fold=1, folds_json=str(folds))
        assert dm.case_ids("val") == ["BraTS2021_00002", "BraTS2021_00003"]
    assert dm.case_ids("train") == ["BraTS2021_00000", "BraTS2021_00001"]
    entries.append({"fold": 2, "image": [], "label": "TrainingData/BraTS2021_09999/BraTS2021_09999_seg.nii.gz"})
    folds.write_text(json.dumps({"training": entries}))
    with pytest.raises(ValueError, match="BraTS2021_09999"):
        BraTS2021DataModule(root=str(brats_root), folds_json=str(folds)).validate()


def test_phantoms_are_deterministic(brats_root, tmp_path):
    again = write_brats_phantom(tmp_path / "again", cases=2, size=24, seed=0)
    for name in ("BraTS2021_00001/BraTS2021_00001_t1ce.nii.gz", "BraTS2021_00001/BraTS2021_00001_seg.nii.gz"):
        a = np.asanyarray(nib.load(str(brats_root / name)).dataobj)
        b = np.asanyarray(nib.load(str(again / name)).dataobj)
        assert np.array_equal(a, b)
    assert json.loads((again / PHANTOM_MARKER).read_text())["kind"] == "brats"
