"""Bad input, injected one fault at a time into tiny datasets on disk: each is stopped before any work with
an InputError naming the case and the file (or the setting), and nothing is written that should not be
(no split file, no checkpoint, no score)."""

import json
import shutil
import warnings
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from segresmamba.bench.aggregate import load_runs, summarise
from segresmamba.callbacks import RunRecorder
from segresmamba.data import BraTS2021DataModule, MSDDataModule
from segresmamba.data.external import write_test_case
from segresmamba.data.write_phantoms import write_brats_phantom, write_msd_phantom
from segresmamba.errors import InputError
from segresmamba.prediction import NiftiMaskWriter
from segresmamba.task import SegmentationTask

BAD = "spleen_2"  # the case each fault is put into


@pytest.fixture(scope="module")
def msd_src(tmp_path_factory):
    """Five labelled cases (spleen_1..5) and two unlabelled ones in imagesTs/ (spleen_6, spleen_7)."""
    return write_msd_phantom(tmp_path_factory.mktemp("src") / "msd", cases=5, size=16, test_cases=2)


@pytest.fixture()
def msd(msd_src, tmp_path):
    root = tmp_path / "Task09_Spleen"
    shutil.copytree(msd_src, root)
    return root


def _dm(root, **kwargs) -> MSDDataModule:
    return MSDDataModule(root=str(root), num_val=2, patch_size=16, num_samples=1, **kwargs)


def _files(root, case=BAD):
    return root / "imagesTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz"


def _rewrite(path: Path, edit, dtype=None, affine=None) -> None:
    """Save ``edit(voxels)`` in place of ``path`` (same affine unless given)."""
    img = nib.load(str(path))
    data = edit(np.asanyarray(img.dataobj).astype(dtype or img.get_data_dtype()))
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))


def _set_first_voxel(value):
    def edit(data):
        data[(0,) * data.ndim] = value
        return data

    return edit


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-12])  # the gzip trailer and the end of the voxels go, the header survives


def _shifted(path: Path) -> np.ndarray:
    affine = nib.load(str(path)).affine.copy()
    affine[0, 3] += 2.0
    return affine


# each fault: what it does to the dataset root, and what the error must say (the case and the file)
FAULTS = {
    "nan image": (
        lambda r: _rewrite(_files(r)[0], _set_first_voxel(np.nan), np.float32),
        rf"{BAD}: .*imagesTr/{BAD}\.nii\.gz has non-finite voxel values \(1 NaN\)",
    ),
    "inf image": (
        lambda r: _rewrite(_files(r)[0], _set_first_voxel(np.inf), np.float32),
        rf"{BAD}: .*imagesTr/{BAD}\.nii\.gz has non-finite voxel values \(1 Inf\)",
    ),
    "empty label": (
        lambda r: _rewrite(_files(r)[1], np.zeros_like),
        rf"{BAD}: label .*labelsTr/{BAD}\.nii\.gz is empty \(no foreground voxel\); set empty_labels",
    ),
    "truncated image": (lambda r: _truncate(_files(r)[0]), rf"{BAD}: cannot read the voxels of .*imagesTr/{BAD}\.nii\.gz"),
    "truncated label": (lambda r: _truncate(_files(r)[1]), rf"{BAD}: cannot read the voxels of .*labelsTr/{BAD}\.nii\.gz"),
    "missing label": (lambda r: _files(r)[1].unlink(), rf"{BAD}: missing file .*labelsTr/{BAD}\.nii\.gz"),
    "shape mismatch": (
        lambda r: _rewrite(_files(r)[1], lambda d: d[:, :, :-2]),
        rf"{BAD}: shape mismatch: label .*labelsTr/{BAD}\.nii\.gz is \(16, 16, 6\)",
    ),
    "affine mismatch": (
        lambda r: _rewrite(_files(r)[1], lambda d: d, affine=_shifted(_files(r)[1])),
        rf"{BAD}: affine mismatch between label .*labelsTr/{BAD}\.nii\.gz and image",
    ),
    "label outside the declared set": (
        lambda r: _rewrite(_files(r)[1], _set_first_voxel(5)),
        rf"{BAD}: label .*labelsTr/{BAD}\.nii\.gz has unexpected value\(s\) \[5\]; allowed \[0, 1\]",
    ),
    "2D image": (
        lambda r: _rewrite(_files(r)[0], lambda d: d[:, :, 0]),
        rf"{BAD}: .*imagesTr/{BAD}\.nii\.gz has shape \(16, 16\): expected a 3D or 4D",
    ),
}


def _split_files(root: Path) -> list[Path]:
    return sorted((root / "splits").glob("*seed*.json")) if (root / "splits").is_dir() else []


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_bad_case_is_named_and_no_split_file_is_written(msd, fault):
    inject, message = FAULTS[fault]
    inject(msd)
    with pytest.raises(InputError, match=message) as err:
        _dm(msd).validate()
    assert "1 of 5 case(s)" in str(err.value) and "skip_bad_cases: true" in str(err.value)
    assert _split_files(msd) == []


def test_rerun_after_removing_the_bad_case_starts_clean(msd):
    FAULTS["truncated image"][0](msd)
    with pytest.raises(InputError, match=BAD):
        _dm(msd).validate()
    # the user removes the case: the next run computes and writes a split of the four left
    meta = json.loads((msd / "dataset.json").read_text())
    meta["training"] = [e for e in meta["training"] if BAD not in e["image"]]
    (msd / "dataset.json").write_text(json.dumps(meta))
    for path in _files(msd):
        path.unlink()
    summary = _dm(msd).validate()
    assert summary["num_train"] + summary["num_val"] == 4
    (split_file,) = _split_files(msd)
    listed = json.loads(split_file.read_text())
    assert BAD not in listed["train"] + listed["val"] and len(listed["train"] + listed["val"]) == 4


def test_the_second_validation_reads_no_voxels(msd, monkeypatch):
    _dm(msd).validate()
    assert (msd / "splits" / "msd_spleen_validation_cache.json").is_file()
    read = []
    monkeypatch.setattr("segresmamba.data.validation.read_voxel_facts", lambda path, role: read.append(path))
    monkeypatch.setattr("segresmamba.data.validation.read_header", lambda path: read.append(path))
    _dm(msd).validate()
    assert read == []


@pytest.mark.parametrize(
    ("where", "setting", "outcome"),
    [
        ("train", None, "error"),
        ("train", "warn", "warn"),
        ("train", "allow", "pass"),
        ("scored", None, "warn"),
        ("scored", "error", "error"),
        ("scored", "allow", "pass"),
    ],
)
def test_empty_labels_error_for_training_and_warn_for_scoring(msd, tmp_path, where, setting, outcome):
    """An empty label is an error for a case that trains or validates and a warning for one that is only
    scored (test_dir), unless ``empty_labels`` says otherwise."""
    test_dir = tmp_path / "external"
    image, label = (nib.load(str(p)) for p in _files(msd, "spleen_1"))
    empty = nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine)
    write_test_case(test_dir, "scan_a", image, empty if where == "scored" else label)
    if where == "train":
        FAULTS["empty label"][0](msd)
    dm = _dm(msd, test_dir=str(test_dir), empty_labels=setting)
    read = (lambda: dm.validate()) if where == "train" else (lambda: dm.external_test_items())
    bad = f"{BAD}.nii.gz" if where == "train" else "scan_a.nii.gz"
    if outcome == "error":
        with pytest.raises(InputError, match=rf"label .*{bad} is empty"):
            read()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read()
    named = [w for w in caught if "empty label" in str(w.message) and bad in str(w.message)]
    assert len(named) == (1 if outcome == "warn" else 0)


def test_missing_brats_modality_is_named(tmp_path):
    root = write_brats_phantom(tmp_path / "BraTS2021", cases=5, size=16)
    (root / "BraTS2021_00003" / "BraTS2021_00003_t1ce.nii.gz").unlink()
    with pytest.raises(InputError, match=r"BraTS2021_00003: missing file .*BraTS2021_00003_t1ce\.nii\.gz"):
        BraTS2021DataModule(root=str(root), patch_size=16).validate()
    assert _split_files(root) == []


def test_a_bad_path_names_the_setting(tmp_path):
    with pytest.raises(InputError, match=r"dataset directory .*nowhere does not exist \(set data.init_args.root"):
        _dm(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"predict_dir: dataset directory .*nothing_here does not exist"):
        _dm(tmp_path / "nowhere", predict_dir=str(tmp_path / "nothing_here"))
    assert not (tmp_path / "nowhere").exists()


def test_a_split_file_listing_absent_cases_is_named_and_kept(msd):
    split = msd / "splits" / "mine.json"
    split.parent.mkdir()
    record = {"format": "segresmamba-split-v1", "dataset": "msd_spleen", "scheme": "holdout", "seed": 0,
              "train": ["spleen_1", "spleen_2", "spleen_3", "spleen_99"], "val": ["spleen_4", "spleen_5"]}
    split.write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"split file .*mine\.json does not match the dataset: 1 listed case\(s\) not in the data \(spleen_99\)"):
        _dm(msd, split_file=str(split)).validate()
    assert json.loads(split.read_text()) == record


def _task(dm: MSDDataModule) -> SegmentationTask:
    return SegmentationTask(
        net="unet", net_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0},
        in_channels=dm.in_channels, out_channels=dm.out_channels, img_size=dm.patch_size, task=dm.task,
        class_names=dm.class_names,
    )


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=1, num_sanity_val_steps=0, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "run"), **kwargs,
    )


@pytest.mark.parametrize("fault", ["nan image", "truncated image", "empty label"])
def test_fit_stops_before_training_and_writes_no_checkpoint(msd, tmp_path, fault):
    FAULTS[fault][0](msd)
    dm = _dm(msd)
    with pytest.raises(InputError, match=FAULTS[fault][1]):
        _trainer(tmp_path).fit(_task(dm), datamodule=dm)
    assert not list((tmp_path / "run").rglob("*.ckpt")) and _split_files(msd) == []


def test_skipped_cases_are_in_metrics_json_and_the_sweep_summary(msd, tmp_path):
    FAULTS["nan image"][0](msd)
    dm = _dm(msd, skip_bad_cases=True)
    record = tmp_path / "sweep" / "paper" / "unet" / "fold0" / "metrics.json"
    with pytest.warns(UserWarning, match=rf"skipping them:\n  - {BAD}: .*NaN"):
        _trainer(tmp_path, callbacks=[RunRecorder(path=str(record))]).fit(_task(dm), datamodule=dm)
    (skipped,) = json.loads(record.read_text())["skipped_cases"]
    assert skipped["case_id"] == BAD and f"imagesTr/{BAD}.nii.gz has non-finite voxel values (1 NaN)" in skipped["reason"]
    runs = load_runs(tmp_path / "sweep")
    assert runs.skipped_cases.tolist() == [BAD]
    assert summarise(runs).skipped_cases.tolist() == [1]


@pytest.mark.parametrize("broken", ["image", "prediction"])
def test_nan_at_test_time_never_yields_a_number(msd, tmp_path, broken):
    """With the up-front voxel check on, a NaN image stops the test before any scoring; with it off (or a
    network that outputs NaN), scoring stops at that case with its name and file, and no Dice is recorded."""
    dm = _dm(msd)
    val_case = dm.case_ids("test")[0]
    task = _task(dm)
    if broken == "image":
        image = _files(msd, val_case)[0]
        _rewrite(image, _set_first_voxel(np.nan), np.float32)
        with pytest.raises(InputError, match=rf"{val_case}: .*{val_case}\.nii\.gz has non-finite voxel values"):
            _trainer(tmp_path).test(task, datamodule=_dm(msd, split_file=str(tmp_path / "split.json")))
        message = rf"case {val_case}: the input image has non-finite values \(NaN or Inf\) \(.*imagesTr/{val_case}\.nii\.gz\)"
    else:
        task.net.register_forward_hook(lambda module, args, out: torch.full_like(out, float("nan")))
        message = rf"case {val_case}: the prediction has non-finite values \(NaN or Inf\) \(.*imagesTr/{val_case}\.nii\.gz\)"
    record = tmp_path / "metrics.json"
    unchecked = _dm(msd, check_voxels=False, split_file=str(tmp_path / "split.json"))
    with pytest.raises(InputError, match=message):
        _trainer(tmp_path, callbacks=[RunRecorder(path=str(record))]).test(task, datamodule=unchecked)
    assert not record.exists()


def test_predict_writes_a_mask_per_unlabelled_image(msd, tmp_path):
    """``predict_dir`` (here the Decathlon imagesTs/) is predicted instead of the test split: one mask per
    image, named by case, on the image's own grid."""
    dm = _dm(msd, predict_dir=str(msd / "imagesTs"))
    writer = NiftiMaskWriter(output_dir=str(tmp_path / "masks"))
    _trainer(tmp_path, callbacks=[writer]).predict(_task(dm), datamodule=dm, return_predictions=False)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["spleen_6.nii.gz", "spleen_7.nii.gz"]
    for case in ("spleen_6", "spleen_7"):
        mask, image = nib.load(tmp_path / "masks" / f"{case}.nii.gz"), nib.load(msd / "imagesTs" / f"{case}.nii.gz")
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
        assert mask.get_data_dtype() == np.uint8


def test_predict_dir_faults_are_named(msd, tmp_path):
    folder = tmp_path / "to_predict"
    shutil.copytree(msd / "imagesTs", folder)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"predict_dir: .*notes\.txt is not a NIfTI file"):
        _dm(msd, predict_dir=str(folder))
    (folder / "notes.txt").unlink()
    _rewrite(folder / "spleen_7.nii.gz", _set_first_voxel(np.nan), np.float32)
    dm = _dm(msd, predict_dir=str(folder))
    writer = NiftiMaskWriter(output_dir=str(tmp_path / "masks"))
    with pytest.raises(InputError, match=r"spleen_7: .*to_predict/spleen_7\.nii\.gz has non-finite voxel values \(1 NaN\)"):
        _trainer(tmp_path, callbacks=[writer]).predict(_task(dm), datamodule=dm, return_predictions=False)
    assert not list((tmp_path / "masks").glob("*.nii.gz"))
