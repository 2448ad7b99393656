"""Dataset fingerprint and plan (nnU-Net's rules) on phantoms of known spacing and intensity; the cache."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from segresmamba.data import SpleenDataModule
from segresmamba.data import plan as plan_module
from segresmamba.data.phantoms import CT_SPACING
from segresmamba.data.plan import fingerprint_cases, make_plan, read_case_ras
from segresmamba.data.transforms import plan_normalization
from segresmamba.data.validation import CaseFiles
from segresmamba.data.write_phantoms import write_spleen_phantom


def _ct_case(seed: int, spacing=(1.0, 1.0, 1.0), shape=(20, 20, 20)):
    """Air (-1000) around a body (0 HU); foreground intensities uniform in [0, 200) HU."""
    rng = np.random.default_rng(seed)
    image = np.full((1, *shape), -1000.0, dtype=np.float32)
    image[:, 2:-2, 2:-2, 2:-2] = 0.0
    label = np.zeros(shape, dtype=np.uint8)
    label[5:15, 5:15, 5:15] = 1
    image[0][label > 0] = rng.uniform(0.0, 200.0, size=int(label.sum()))
    return image, label, spacing


def test_ct_plan_clips_to_foreground_percentiles_and_z_scores():
    fingerprint = fingerprint_cases([_ct_case(i) for i in range(3)], 3)
    plan = make_plan(fingerprint, ["CT"])
    (entry,) = plan["normalization"]
    assert entry["scheme"] == "ct"
    assert entry["clip"][0] == pytest.approx(1.0, abs=0.5) and entry["clip"][1] == pytest.approx(199.0, abs=0.5)
    assert entry["mean"] == pytest.approx(100.0, abs=1.5) and entry["std"] == pytest.approx(200 / 12**0.5, rel=0.02)
    case = fingerprint["cases"][0]
    assert case["spacing"] == [1.0, 1.0, 1.0] and case["shape"] == [20, 20, 20] and case["foreground_voxels"] == 1000
    assert case["relative_size_after_crop"] == 1.0  # air is -1000, not 0: nothing to crop
    image = _ct_case(9)[0]
    out = Compose(plan_normalization(plan["normalization"]))({"image": torch.as_tensor(image)})["image"]
    low, high = entry["clip"]
    assert float(out.min()) == pytest.approx((low - entry["mean"]) / entry["std"], abs=1e-4)  # air clipped
    assert float(out.max()) <= (high - entry["mean"]) / entry["std"] + 1e-4


@pytest.mark.parametrize(("head_side", "use_mask"), [(10, True), (19, False)])
def test_mr_z_score_uses_the_nonzero_mask_only_when_cropping_shrinks_the_image(head_side, use_mask):
    cases = []
    for seed in range(3):
        image = np.zeros((2, 20, 20, 20), dtype=np.float32)
        image[:, :head_side, :head_side, :head_side] = 300.0 + seed
        label = np.zeros((20, 20, 20), dtype=np.uint8)
        label[:4, :4, :4] = 1
        cases.append((image, label, (1.0, 1.0, 1.0)))
    plan = make_plan(fingerprint_cases(cases, 3), ["T1", "FLAIR"])
    assert plan["normalization"] == [{"scheme": "zscore", "use_nonzero_mask": use_mask}] * 2
    assert plan["median_relative_size_after_crop"] == pytest.approx((head_side / 20) ** 3)


def test_target_spacing_median_and_anisotropic_axis():
    iso = [_ct_case(i, spacing=s) for i, s in enumerate([(1.0, 1.0, 1.0), (1.2, 1.2, 1.5), (0.8, 0.8, 2.0)])]
    plan = make_plan(fingerprint_cases(iso, 3), ["CT"])
    assert plan["target_spacing"] == [1.0, 1.0, 1.5] and plan["anisotropic_axis"] is None
    # thick slices (median 5 mm > 3 x 0.8 mm) and few of them (6 < 40 / 3): the 10th percentile of z
    spacings = [(0.8, 0.8, 5.0), (0.8, 0.8, 4.0), (0.8, 0.8, 6.0), (0.8, 0.8, 3.0), (0.8, 0.8, 5.0)]
    aniso = [_ct_case(i, spacing=s, shape=(40, 40, 6)) for i, s in enumerate(spacings)]
    plan = make_plan(fingerprint_cases(aniso, 5), ["CT"])
    assert plan["anisotropic_axis"] == 2
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, float(np.percentile([5, 4, 6, 3, 5], 10))])
    # anisotropic spacing but as many voxels along z as in-plane: nnU-Net keeps the median
    many = [_ct_case(i, spacing=s, shape=(20, 20, 20)) for i, s in enumerate(spacings)]
    assert make_plan(fingerprint_cases(many, 5), ["CT"])["target_spacing"] == [0.8, 0.8, 5.0]


def test_spacing_is_read_in_ras_order(tmp_path):
    """An LSA-like file (voxel axes: x->L, y->S, z->A) with zooms (1, 3, 2) has RAS spacing (1, 2, 3)."""
    affine = np.array([[-1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])
    data = np.zeros((4, 5, 6), dtype=np.float32)
    data[1, 2, 3] = 7.0
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image((data > 0).astype(np.uint8), affine), str(tmp_path / "seg.nii.gz"))
    case = CaseFiles(case_id="c", images=(tmp_path / "img.nii.gz",), label=tmp_path / "seg.nii.gz", channels=1, label_values=frozenset({0, 1}))
    image, label, spacing = read_case_ras(case)
    assert spacing == [1.0, 2.0, 3.0] and image.shape == (1, 4, 6, 5) and label.shape == (4, 6, 5)
    assert image[0][label > 0].tolist() == [7.0]


@pytest.fixture
def spleen_root(tmp_path):
    return write_spleen_phantom(tmp_path / "Task09_Spleen", cases=5, size=24, seed=0)


def test_plan_from_files_cached_reused_and_invalidated(spleen_root, monkeypatch):
    dm = SpleenDataModule(root=str(spleen_root), num_val=1, patch_size=16, recipe="nnunet")
    plan = dm.validate()["plan"]
    assert plan["target_spacing"] == pytest.approx(list(CT_SPACING)) and plan["normalization"][0]["scheme"] == "ct"
    assert plan["overridden"] == [] and plan["num_training_cases"] == 4
    path = dm.plan_path()
    assert path.parent == spleen_root / "splits" and path.is_file() and plan["file"] == str(path)
    assert json.loads(path.read_text())["key"] == plan["key"]

    def refuse(*args, **kwargs):
        raise AssertionError("the cached plan should have been read")

    monkeypatch.setattr(plan_module, "fingerprint_cases", refuse)
    again = SpleenDataModule(root=str(spleen_root), num_val=1, patch_size=16, recipe="nnunet")
    assert again.plan["key"] == plan["key"] and again.plan["normalization"] == plan["normalization"]
    monkeypatch.undo()

    # a changed training case changes the key: the plan is computed again
    train_case = again.case_ids("train")[0]
    image_path = spleen_root / "imagesTr" / f"{train_case}.nii.gz"
    img = nib.load(str(image_path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.float32) + 50.0, img.affine), str(image_path))
    changed = SpleenDataModule(root=str(spleen_root), num_val=1, patch_size=16, recipe="nnunet")
    assert changed.plan["key"] != plan["key"] and changed.plan["normalization"] != plan["normalization"]
    assert json.loads(path.read_text())["key"] == changed.plan["key"]


def test_explicit_settings_override_the_plan(spleen_root):
    dm = SpleenDataModule(
        root=str(spleen_root), num_val=1, patch_size=16, recipe="nnunet", spacing=(2.0, 2.0, 2.0), intensity_window=(-50.0, 150.0)
    )
    plan = dm.plan
    assert plan["target_spacing"] == [2.0, 2.0, 2.0] and plan["normalization"] == [{"scheme": "window", "window": [-50.0, 150.0]}]
    assert plan["overridden"] == ["target_spacing", "normalization"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16, 16)
    val = next(iter(dm.val_dataloader()))
    assert float(val["image"].min()) == 0.0 and float(val["image"].max()) <= 1.0  # the window, mapped to [0, 1]
    assert tuple(val["image"].shape[2:]) == tuple(round(n * s / 2.0) for n, s in zip((24, 24, 10), CT_SPACING))


def test_paper_recipe_neither_computes_nor_records_a_plan(spleen_root):
    dm = SpleenDataModule(root=str(spleen_root), num_val=1, patch_size=16)
    summary = dm.validate()
    assert "plan" not in summary and summary["recipe"] == "paper"
    assert not dm.plan_path().exists()
    assert (dm.spacing, dm.intensity_window) == ((1.5, 1.5, 2.0), (-57.0, 164.0))  # the paper's spleen settings


def test_brats_and_btcv_nnunet_chains(tmp_path):
    from segresmamba.data import BraTS2021DataModule, BTCVDataModule
    from segresmamba.data.write_phantoms import write_brats_phantom, write_btcv_phantom

    brats = BraTS2021DataModule(root=str(write_brats_phantom(tmp_path / "brats", cases=5, size=24)), patch_size=16, recipe="nnunet")
    plan = brats.validate()["plan"]
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and plan["normalization"] == [{"scheme": "zscore", "use_nonzero_mask": True}] * 4
    batch = next(iter(brats.train_dataloader()))
    assert batch["image"].shape[1:] == (4, 16, 16, 16) and batch["label"].shape[1:] == (3, 16, 16, 16)
    assert batch["label"].dtype == torch.float32 and set(batch["label"].unique().tolist()) <= {0.0, 1.0}
    btcv = BTCVDataModule(root=str(write_btcv_phantom(tmp_path / "btcv", cases=4, size=24)), num_val=1, patch_size=16, recipe="nnunet", num_samples=1)
    assert btcv.validate()["plan"]["normalization"][0]["scheme"] == "ct"
    assert (btcv.spacing, btcv.intensity_window) == ((1.5, 1.5, 2.0), (-175.0, 250.0))  # the paper's, unused here
    val = next(iter(btcv.val_dataloader()))
    assert tuple(val["image"].shape[2:]) == tuple(val["label"].shape[2:]) == (24, 24, 10)  # the plan: the phantoms' own spacing
