"""The nnunet recipe's augmentation (nnU-Net v2's default, from MONAI transforms), the paper chains it sits
beside, and fixed iterations per epoch."""

import numpy as np
import pytest
import torch
from monai.transforms import Compose, Randomizable, RandCropByPosNegLabeld

from segresmamba.data import MNI152TissueDataModule, SyntheticBraTSDataModule
from segresmamba.data.transforms import brats_train_transforms, ct_train_transforms
from segresmamba.recipes.augment import FusedResampling, initial_patch_size, nnunet_augmentations

PATCH = (16, 16, 16)


def _volume(shape=(40, 36, 30)):
    """A z-scored-like image (air -1.5 around a 'body') with labels 0, 1, 2 in the body."""
    rng = np.random.default_rng(0)
    image = np.full((1, *shape), -1.5, dtype=np.float32)
    image[:, 8:32, 6:30, 5:25] = rng.normal(0.5, 0.3, size=(1, 24, 24, 20))
    label = np.zeros((1, *shape), dtype=np.int64)
    label[0, 15:22, 12:20, 10:18] = 2
    label[0, 24:27, 22:25, 18:21] = 1
    return {"image": image, "label": label}


def _set_prob(transform, prob: float) -> None:
    if isinstance(transform, Compose):
        for child in transform.transforms:
            _set_prob(child, prob)
    elif hasattr(transform, "prob"):
        transform.prob = prob


def test_initial_patch_size_is_nnunets():
    assert initial_patch_size((64, 64, 64)) == [102, 102, 102]  # nnU-Net v2's get_patch_size for 30 deg
    assert initial_patch_size((128, 128, 128)) == [206, 206, 206]
    sides = initial_patch_size((16, 24, 32))
    assert all(s > p and (s - p) % 2 == 0 for s, p in zip(sides, (16, 24, 32)))
    assert initial_patch_size((16, 16, 16), rotation_deg=0.0) == [18, 18, 18]  # 16 / 0.85, made even
    with pytest.raises(ValueError, match="rotation_deg"):
        initial_patch_size(PATCH, rotation_deg=120.0)


def test_whole_chain_shapes_labels_determinism():
    chain = Compose(nnunet_augmentations(PATCH, num_samples=3))
    data = _volume()
    for seed in range(6):
        chain.set_random_state(seed)
        patches = chain(data)
        assert len(patches) == 3
        for p in patches:
            assert p["image"].shape == (1, *PATCH) and p["label"].shape == (1, *PATCH)
            assert set(torch.unique(p["label"]).tolist()) <= {0, 1, 2}
            assert torch.isfinite(p["image"]).all() and p["image"].min() > -100  # no padding marker left
    chain.set_random_state(7)
    a = chain(data)
    chain.set_random_state(7)
    b = chain(data)
    assert all(torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"]) for x, y in zip(a, b))
    assert np.array_equal(data["label"], _volume()["label"])  # the input is left as it was


AFTER_CROP = [i for i, t in enumerate(nnunet_augmentations(PATCH)) if isinstance(t, Randomizable)][1:]


@pytest.mark.parametrize("index", AFTER_CROP)
def test_each_transform_on_a_patch(index):
    """Each random transform after the crop, forced on: the patch keeps its shape, labels keep their values,
    the same seed gives the same output, and it changes the patch."""
    transform = nnunet_augmentations(PATCH)[index]
    _set_prob(transform, 1.0)
    rng = np.random.default_rng(index)
    patch = {
        "image": torch.as_tensor(rng.normal(size=(1, *PATCH)).astype(np.float32)),
        "label": torch.as_tensor((rng.random((1, *PATCH)) > 0.7).astype(np.int64) * 2),
    }
    if isinstance(transform, FusedResampling):
        from monai.data import MetaTensor

        patch = {k: MetaTensor(v) for k, v in patch.items()}
    outputs = []
    for _ in range(2):
        transform.set_random_state(3)
        outputs.append(transform({k: v.clone() for k, v in patch.items()}))
    out = outputs[0]
    assert out["image"].shape == patch["image"].shape and out["label"].shape == patch["label"].shape
    assert set(torch.unique(out["label"]).tolist()) <= {0, 2}
    assert torch.equal(torch.as_tensor(out["image"]), torch.as_tensor(outputs[1]["image"]))
    assert not torch.equal(torch.as_tensor(out["image"]), patch["image"])


def _centres(num: int, seed: int = 0):
    """Labels and images at the centre voxel of ``num`` crops (the centre of the final patch)."""
    steps = nnunet_augmentations(PATCH, num_samples=num)
    at = next(i for i, t in enumerate(steps) if isinstance(t, RandCropByPosNegLabeld))
    crop = Compose(steps[: at + 2])  # up to the crop and the removal of the padding marker
    crop.set_random_state(seed)
    patches = crop(_volume())
    mid = tuple(s // 2 for s in initial_patch_size(PATCH))
    return [int(p["label"][(0, *mid)]) for p in patches], [float(p["image"][(0, *mid)]) for p in patches]


def test_a_third_of_the_patches_are_centred_on_foreground():
    labels, _ = _centres(900)
    fraction = np.mean([v > 0 for v in labels])
    assert abs(fraction - 0.33) < 0.05


def test_background_centres_can_be_air():
    labels, images = _centres(300, seed=1)
    air = [v for lab, v in zip(labels, images) if lab == 0 and v == -1.5]
    assert len(air) > 30  # air is a large part of the volume; padding (never a centre) is not


# -- the paper recipe's chains: unchanged ----------------------------------------------------------------


def test_paper_ct_chain_unchanged():
    chain = ct_train_transforms(PATCH, (1.5, 1.5, 2.0), (-175.0, 250.0), 4)
    names = [type(t).__name__ for t in chain.transforms]
    assert names == [
        "LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged", "CropForegroundd",
        "SpatialPadd", "RandCropByPosNegLabeld", "RandFlipd", "RandFlipd", "RandFlipd", "RandRotate90d",
        "RandShiftIntensityd", "EnsureTyped", "EnsureTyped",
    ]
    t = {type(x).__name__: x for x in chain.transforms}
    assert tuple(t["Spacingd"].spacing_transform.pixdim) == (1.5, 1.5, 2.0)
    scaler = t["ScaleIntensityRanged"].scaler
    assert (scaler.a_min, scaler.a_max, scaler.b_min, scaler.b_max, scaler.clip) == (-175.0, 250.0, 0.0, 1.0, True)
    crop = t["RandCropByPosNegLabeld"]
    assert (crop.cropper.pos_ratio, crop.cropper.num_samples, crop.image_key) == (0.5, 4, "image")
    flips = [x for x in chain.transforms if type(x).__name__ == "RandFlipd"]
    assert [f.prob for f in flips] == [0.1, 0.1, 0.1] and [f.flipper.spatial_axis for f in flips] == [0, 1, 2]
    assert t["RandRotate90d"].prob == 0.1 and t["RandRotate90d"].max_k == 3
    assert t["RandShiftIntensityd"].prob == 0.5 and t["RandShiftIntensityd"].shifter.offsets == (-0.1, 0.1)


def test_paper_mr_chain_draws_background_anywhere():
    """The one change to the paper chains: without a window (z-scored MR) background centres are any
    background voxel, not only voxels brighter than the mean."""
    chain = ct_train_transforms(PATCH, None, None, 2)
    crop = next(x for x in chain.transforms if isinstance(x, RandCropByPosNegLabeld))
    assert crop.image_key is None
    assert next(x for x in ct_train_transforms(PATCH, None, (0.0, 1.0), 2).transforms if isinstance(x, RandCropByPosNegLabeld)).image_key == "image"


def test_paper_brats_chains_unchanged():
    names = [type(t).__name__ for t in brats_train_transforms(PATCH).transforms]
    assert names == [
        "LoadImaged", "EnsureChannelFirstd", "ConvertToMultiChannelBasedOnBratsClassesd", "CropForegroundd",
        "RandSpatialCropd", "RandFlipd", "RandFlipd", "RandFlipd", "NormalizeIntensityd", "RandScaleIntensityd",
        "RandShiftIntensityd", "EnsureTyped", "EnsureTyped",
    ]
    synthetic = [type(t).__name__ for t in SyntheticBraTSDataModule(volume_size=32, patch_size=16).train_transforms().transforms]
    assert synthetic == [
        "EnsureTyped", "ConvertToMultiChannelBasedOnBratsClassesd", "RandSpatialCropd", "RandFlipd", "RandFlipd",
        "RandFlipd", "NormalizeIntensityd", "RandScaleIntensityd", "RandShiftIntensityd", "EnsureTyped",
    ]


def test_recipe_selects_the_chain():
    paper = SyntheticBraTSDataModule(volume_size=32, patch_size=16)
    nnunet = SyntheticBraTSDataModule(volume_size=32, patch_size=16, recipe="nnunet")
    assert "plan" not in paper.describe() and paper.describe()["recipe"] == "paper"
    assert nnunet.describe()["plan"]["normalization"][0]["scheme"] == "zscore"
    names = [type(t).__name__ for t in nnunet.train_transforms().transforms]
    assert "RandCropByPosNegLabeld" in names and "FusedResampling" in names and "RandSpatialCropd" not in names
    batch = next(iter(nnunet.train_dataloader()))
    assert batch["image"].shape == (1, 4, 16, 16, 16) and batch["label"].shape == (1, 3, 16, 16, 16)
    with pytest.raises(ValueError, match="unknown recipe"):
        SyntheticBraTSDataModule(recipe="fancy")


# -- iterations per epoch --------------------------------------------------------------------------------


def test_iterations_per_epoch():
    assert len(SyntheticBraTSDataModule(volume_size=32, patch_size=16, num_train=3).train_dataloader()) == 3
    assert len(SyntheticBraTSDataModule(volume_size=32, patch_size=16, num_train=3, recipe="nnunet").train_dataloader()) == 250
    dm = SyntheticBraTSDataModule(volume_size=32, patch_size=16, num_train=3, recipe="nnunet", iterations_per_epoch=5, batch_size=2)
    loader = dm.train_dataloader()
    assert len(loader) == 5 and len(list(loader)) == 5
    assert len(SyntheticBraTSDataModule(volume_size=32, patch_size=16, num_train=3, iterations_per_epoch=4).train_dataloader()) == 4
    with pytest.raises(ValueError, match="iterations_per_epoch"):
        SyntheticBraTSDataModule(iterations_per_epoch=0)


def test_mni152_nnunet_recipe():
    dm = MNI152TissueDataModule(patch_size=32, num_samples=2, recipe="nnunet", iterations_per_epoch=1)
    dm.setup("fit")
    assert dm.plan["target_spacing"] == [2.0, 2.0, 2.0] and dm.plan["normalization"][0]["scheme"] == "zscore"
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32, 32) and set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}
    val = next(iter(dm.val_dataloader()))
    assert abs(float(val["image"].mean())) < 1e-3 and abs(float(val["image"].std()) - 1.0) < 1e-2  # per-image z-score
