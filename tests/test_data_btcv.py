"""BTCV adapter on phantoms: folder layout, MONAI datalist json, 14 channels, RAS resampling, batches."""

import json

import numpy as np
import pytest
import torch

from segresmamba.data import BTCVDataModule
from segresmamba.data.phantoms import BTCV_ORGANS
from segresmamba.data.write_phantoms import write_btcv_phantom


@pytest.fixture(scope="module")
def btcv_root(tmp_path_factory):
    return write_btcv_phantom(tmp_path_factory.mktemp("btcv") / "BTCV", cases=6, size=40, seed=0)


def test_contract_and_class_names():
    assert (BTCVDataModule.in_channels, BTCVDataModule.out_channels, BTCVDataModule.task) == (1, 14, "multiclass")
    assert BTCVDataModule.class_names == list(BTCV_ORGANS) and len(BTCVDataModule.class_names) == 13
    with pytest.raises(ValueError, match="needs split: kfold"):
        BTCVDataModule(root="x", fold=1)
    with pytest.raises(ValueError, match="intensity_window"):
        BTCVDataModule(root="x", intensity_window=(250.0, -175.0))


def test_folder_layout_holdout_and_batches(btcv_root, tmp_path):
    dm = BTCVDataModule(
        root=str(btcv_root), num_val=2, patch_size=16, batch_size=2, num_samples=2, split_file=str(tmp_path / "s.json")
    )
    summary = dm.validate()
    assert summary["provenance"] == "synthetic" and summary["num_train"] == 4 and summary["num_val"] == 2
    assert dm.case_ids("test") == dm.case_ids("val")
    batch = next(iter(dm.train_dataloader()))
    # RandCropByPosNegLabeld gives num_samples patches per volume; the loader flattens them
    assert batch["image"].shape == (4, 1, 16, 16, 16) and batch["label"].shape == (4, 1, 16, 16, 16)
    assert batch["label"].dtype == torch.int64 and -0.11 <= batch["image"].min() and batch["image"].max() <= 1.11  # [0, 1] +- shift 0.1
    val = next(iter(dm.val_dataloader()))
    # 40 x 40 x 16 voxels of 0.8 x 0.8 x 2.5 mm resampled to 1.5 x 1.5 x 2.0 mm, whole volume
    assert val["image"].shape[:2] == (1, 1) and val["image"].shape[2:] == (22, 22, 20)
    label = val["label"][0, 0].numpy()
    assert set(np.unique(label)) <= set(range(14)) and len(np.unique(label)) >= 12
    # stored LPS, reoriented to RAS: the spleen lies on the patient's left of the liver (smaller x)
    x = lambda k: np.argwhere(label == k)[:, 0].mean()  # noqa: E731
    assert x(1) < x(6)


def test_kfold_and_datalist(btcv_root, tmp_path):
    vals = []
    for fold in range(3):
        dm = BTCVDataModule(root=str(btcv_root), split="kfold", num_folds=3, fold=fold, split_file=str(tmp_path / "k.json"))
        vals += dm.case_ids("val")
        assert len(dm.case_ids("train")) == 4
    assert sorted(vals) == [f"{i:04d}" for i in range(1, 7)]
    dm = BTCVDataModule(root=str(btcv_root), datalist_json="dataset_0.json")
    datalist = json.loads((btcv_root / "dataset_0.json").read_text())
    assert dm.case_ids("val") == [e["image"][7:11] for e in datalist["validation"]] == ["0006"]
    assert dm.validate()["split_source"].endswith("dataset_0.json")
    item = dm.items("train")[0]
    assert item["image"].endswith("img0001.nii.gz") and item["label"].endswith("label0001.nii.gz")


def test_cache_and_workers(btcv_root, tmp_path):
    dm = BTCVDataModule(
        root=str(btcv_root), num_val=1, patch_size=16, num_samples=3, cache_rate=1.0, num_workers=1,
        split_file=str(tmp_path / "c.json"),
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 1, 16, 16, 16)


def test_labelled_test_list_in_datalist(btcv_root, tmp_path):
    datalist = json.loads((btcv_root / "dataset_0.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    for e in entries:  # paths relative to the new json's folder
        e["image"], e["label"] = str(btcv_root / e["image"]), str(btcv_root / e["label"])
    custom = {"training": entries[:4], "validation": entries[4:5], "test": entries[5:]}
    path = tmp_path / "with_test.json"
    path.write_text(json.dumps(custom))
    dm = BTCVDataModule(root=str(btcv_root), datalist_json=str(path))
    assert dm.case_ids("val") == ["0005"] and dm.case_ids("test") == ["0006"]
    assert dm.validate()["test_is_val"] is False
