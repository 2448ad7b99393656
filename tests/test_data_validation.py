"""Validation before training: every bad input gets a clear message naming the file."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from segresmamba.data import BraTS2021DataModule, BTCVDataModule, MSDDataModule
from segresmamba.data.write_phantoms import write_brats_phantom, write_btcv_phantom, write_msd_phantom


@pytest.fixture(scope="module")
def brats_src(tmp_path_factory):
    return write_brats_phantom(tmp_path_factory.mktemp("src") / "brats", cases=5, size=16, seed=0)


@pytest.fixture()
def brats(brats_src, tmp_path):
    dst = tmp_path / "BraTS2021"
    shutil.copytree(brats_src, dst)
    return dst


def _dm(root, **kw):
    return BraTS2021DataModule(root=str(root), patch_size=16, **kw)


def _case_file(root, i, suffix):
    return root / f"BraTS2021_{i:05d}" / f"BraTS2021_{i:05d}_{suffix}.nii.gz"


def test_good_data_passes(brats):
    assert _dm(brats).validate()["skipped_cases"] == []


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"dataset directory .*nowhere does not exist"):
        _dm(tmp_path / "nowhere").validate()


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no cases found in .*empty"):
        _dm(tmp_path / "empty").validate()
    (tmp_path / "btcv" / "img").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no cases found in .*img"):
        BTCVDataModule(root=str(tmp_path / "btcv")).validate()


def test_missing_file(brats):
    _case_file(brats, 1, "t1").unlink()
    with pytest.raises(ValueError, match=r"BraTS2021_00001: missing file .*BraTS2021_00001_t1\.nii\.gz"):
        _dm(brats).validate()


def test_corrupt_nifti(brats):
    _case_file(brats, 2, "flair").write_bytes(b"this is not a NIfTI file at all")
    with pytest.raises(ValueError, match=r"BraTS2021_00002: cannot read .*BraTS2021_00002_flair\.nii\.gz as NIfTI"):
        _dm(brats).validate()


def test_label_3_in_brats(brats):
    path = _case_file(brats, 3, "seg")
    seg = np.asanyarray(nib.load(str(path)).dataobj).copy()
    seg[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(seg, nib.load(str(path)).affine), str(path))
    with pytest.raises(ValueError, match=r"label .*BraTS2021_00003_seg\.nii\.gz has unexpected value\(s\) \[3\]; allowed \[0, 1, 2, 4\]"):
        _dm(brats).validate()
    _dm(brats, check_voxels=False).validate()  # header checks only: passes (documented cost trade-off)


def test_wrong_channel_count(brats):
    path = _case_file(brats, 0, "t2")
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.stack([img.get_fdata()] * 2, -1).astype(np.int16), img.affine), str(path))
    with pytest.raises(ValueError, match=r"wrong channel count: .*BraTS2021_00000_t2\.nii\.gz has shape \(16, 16, 16, 2\)"):
        _dm(brats).validate()


def test_wrong_channel_count_msd(tmp_path):
    root = write_msd_phantom(tmp_path / "msd", cases=3, size=16)
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "CT", "1": "PET"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"wrong channel count: .*spleen_1\.nii\.gz has 1 channel\(s\).*expected 2"):
        MSDDataModule(root=str(root), num_val=1).validate()


def test_shape_and_affine_mismatch(brats):
    seg_path = _case_file(brats, 1, "seg")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), nib.load(str(seg_path)).affine), str(seg_path))
    t1 = _case_file(brats, 4, "t1")
    img = nib.load(str(t1))
    shifted = img.affine.copy()
    shifted[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), str(t1))
    with pytest.raises(ValueError) as err:
        _dm(brats).validate()
    msg = str(err.value)
    # one error lists every bad case
    assert "2 of 5 case(s)" in msg
    assert "BraTS2021_00001: shape mismatch: label" in msg and "(16, 16, 12)" in msg
    assert "BraTS2021_00004: affine mismatch between" in msg and "BraTS2021_00004_t1.nii.gz" in msg
    assert "skip_bad_cases: true" in msg


def test_skip_bad_cases_warns_and_continues(brats):
    _case_file(brats, 1, "flair").unlink()
    _case_file(brats, 3, "seg").write_bytes(b"garbage")
    dm = _dm(brats, skip_bad_cases=True)
    with pytest.warns(UserWarning, match=r"skipping them:\n  - BraTS2021_00001: missing file.*\n  - BraTS2021_00003: cannot read"):
        summary = dm.validate()
    assert summary["skipped_cases"] == ["BraTS2021_00001", "BraTS2021_00003"]
    used = dm.case_ids("train") + dm.case_ids("val")
    assert "BraTS2021_00001" not in used and len(used) == 3


def test_btcv_missing_label_and_bad_value(tmp_path):
    root = write_btcv_phantom(tmp_path / "btcv", cases=3, size=16)
    (root / "label" / "label0002.nii.gz").unlink()
    path = root / "label" / "label0003.nii.gz"
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 14
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    with pytest.raises(ValueError) as err:
        BTCVDataModule(root=str(root), num_val=1).validate()
    assert "0002: missing file" in str(err.value) and "label0003.nii.gz has unexpected value(s) [14]" in str(err.value)


def test_setup_runs_validation(brats):
    _case_file(brats, 0, "t1ce").unlink()
    with pytest.raises(ValueError, match="missing file"):
        _dm(brats).setup("fit")


def test_validation_cache_rereads_only_changed_files(brats, monkeypatch):
    """What each file held is remembered by path, size and mtime: a changed file is read again (and its
    new fault found), the others are not."""
    from segresmamba.data import validation

    _dm(brats).validate()
    read = []
    real = validation.read_voxel_facts
    monkeypatch.setattr(validation, "read_voxel_facts", lambda path, role: read.append(path) or real(path, role))
    path = _case_file(brats, 2, "seg")
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(path))
    with pytest.raises(ValueError, match=r"BraTS2021_00002: label .*BraTS2021_00002_seg\.nii\.gz is empty"):
        _dm(brats).validate()
    assert read == [path]
    (brats / "splits" / "brats2021_validation_cache.json").write_text("{not json")  # a damaged cache only costs time
    assert _dm(brats, empty_labels="allow").validate()["skipped_cases"] == []
