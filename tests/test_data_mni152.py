"""MNI152 tissue task: real template bundled with nilearn, 4 classes, spatial train/val slabs."""

import numpy as np
import pytest
import torch

from segresmamba.data import MNI152TissueDataModule
from segresmamba.data.mni152 import mni152_tissue_volumes


@pytest.fixture(scope="module")
def volumes():
    return mni152_tissue_volumes(resolution=2)


def test_labels(volumes):
    image, label, affine = volumes
    assert image.shape == label.shape == (99, 117, 95)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    counts = np.bincount(label.ravel())
    assert counts[2] > counts[1] and counts[3] > counts[1]  # GM and WM dominate the brain


@pytest.mark.parametrize("axis", ["anterior-posterior", "superior-inferior"])
def test_slabs_disjoint_with_margin(axis):
    dm = MNI152TissueDataModule(axis=axis, fold=1, margin=3, patch_size=32)
    summary = dm.validate()
    assert dm.axis_index != 0  # never split left-right (the template is symmetric)
    v0, v1 = summary["val_slab"]
    for a, b in summary["train_slabs"]:
        assert b <= v0 - 3 or a >= v1 + 3
    assert summary["provenance"] == "real" and dm.name == "mni152_tissue"
    assert dm.class_names == ["CSF/other", "GM", "WM"] and dm.out_channels == 4
    val = dm.items("val")[0]
    assert val["label"].shape[1 + dm.axis_index] == v1 - v0
    assert dm.items("test")[0]["case_id"] == val["case_id"]
    bounds = dm.slabs["all"]
    assert bounds[0][0] == 0 and all(bounds[i][1] == bounds[i + 1][0] for i in range(3))


def test_batches():
    dm = MNI152TissueDataModule(fold=0, patch_size=32, batch_size=2, num_samples=2, train_items=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 1, 32, 32, 32) and batch["label"].dtype == torch.int64
    assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}
    assert len(dm.items("train")) == 4
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[:2] == (1, 1) and val["image"].shape[2:] == dm.items("val")[0]["image"].shape[1:]
    assert set(val["label"].unique().tolist()) == {0, 1, 2, 3}
    # items are not modified by the transforms
    item = dm.items("train")[0]["image"]
    before = item.copy()
    next(iter(dm.train_dataloader()))
    assert np.array_equal(before, dm.items("train")[0]["image"])


def test_bad_settings():
    with pytest.raises(ValueError, match="never left-right"):
        MNI152TissueDataModule(axis="left-right")
    with pytest.raises(ValueError, match="fold must be within"):
        MNI152TissueDataModule(num_blocks=4, fold=4)


@pytest.mark.parametrize("recipe", ["paper", "nnunet"])
def test_held_out_slab_keeps_its_place_in_mni_space(recipe):
    from segresmamba.metrics import voxel_spacing

    dm = MNI152TissueDataModule(resolution=2, num_blocks=4, fold=1, recipe=recipe)
    item = dm.eval_transforms()(dm.items("val")[0])
    _, _, affine = mni152_tissue_volumes(2)
    start = dm.slabs["val"][0]
    assert voxel_spacing(item["label"]) == (2.0, 2.0, 2.0)  # HD95 in mm, not voxels
    # voxel 0 of the slab is voxel `start` of the template along the split axis
    corner = np.zeros(4)
    corner[dm.axis_index], corner[3] = start, 1.0
    np.testing.assert_allclose(np.asarray(item["label"].affine)[:, 3], affine @ corner)
