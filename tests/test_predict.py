"""Evaluation and export in the original image space: an LSA-oriented, anisotropic (1.2 x 1.2 x 3 mm)
phantom in the Decathlon layout goes through the evaluation chain (RAS, resampling), and predictions come
back on the scan's own grid, as scores and as NIfTI masks."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from segresmamba.cli import main
from segresmamba.data import MSDDataModule
from segresmamba.prediction import NiftiMaskWriter, brats_label_map, export_mask
from segresmamba.task import SegmentationTask

SHAPE = (20, 18, 9)
# voxel axes i, j, k point to Left, Superior, Anterior with 1.2, 1.2 and 3 mm voxels
LSA_AFFINE = np.array([[-1.2, 0, 0, 10.0], [0, 0, 3.0, -20.0], [0, 1.2, 0, 5.0], [0, 0, 0, 1]])


def phantom_label(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    x, y = rng.integers(2, 5, size=2)
    label[x : x + 8, y : y + 7, 2:6] = 1
    label[x + 9 : x + 14, 3:9, 4:8] = 2
    return label


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    """Three cases; the image holds the label value (a CT-like window (0, 2) maps it to [0, 1])."""
    root = tmp_path_factory.mktemp("lsa") / "Task99_LSA"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for n in range(3):
        label = phantom_label(n)
        nib.save(nib.Nifti1Image(label.astype(np.float32), LSA_AFFINE), root / f"imagesTr/lsa_{n}.nii.gz")
        nib.save(nib.Nifti1Image(label, LSA_AFFINE), root / f"labelsTr/lsa_{n}.nii.gz")
        training.append({"image": f"./imagesTr/lsa_{n}.nii.gz", "label": f"./labelsTr/lsa_{n}.nii.gz"})
    meta = {"name": "LSA", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "a", "2": "b"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    assert nib.aff2axcodes(LSA_AFFINE) == ("L", "S", "A")
    return root


class ReadsTheLabelValue(torch.nn.Module):
    """A perfect "network" for the phantom: class k where the windowed image is k / 2."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([-50 * (2 * image - k) ** 2 for k in range(3)], dim=1)


def perfect_task(**kwargs) -> SegmentationTask:
    task = SegmentationTask(
        net="unet", net_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0}, in_channels=1,
        out_channels=3, img_size=16, task="multiclass", class_names=["a", "b"], **kwargs,
    )
    task.net = ReadsTheLabelValue()
    return task


def data(root, spacing, tmp_path) -> MSDDataModule:
    dm = MSDDataModule(
        root=str(root), num_val=1, spacing=spacing, intensity_window=(0.0, 2.0), patch_size=16,
        split_file=str(tmp_path / "split.json"),
    )
    dm.setup("test")
    return dm


def test_round_trip_of_a_perfect_prediction(msd_root, tmp_path):
    # 1.2 x 3 x 1.2 mm in RAS order -> 1.2 x 1.5 x 1.2: the 3 mm axis is upsampled twice, an exact round trip
    dm = data(msd_root, (1.2, 1.5, 1.2), tmp_path)
    loader = dm.test_dataloader()
    batch = next(iter(loader))
    assert batch["image"].shape[2:] == (20, 17, 18)  # the evaluated grid is not the scan's
    task = perfect_task()
    ids, dice, hd95, spacing = task.score_batch(batch, "original", loader.dataset.transform)
    assert dice.tolist() == [[1.0, 1.0]] and hd95.tolist() == [[0.0, 0.0]]
    assert spacing[0].tolist() == pytest.approx([1.2, 1.2, 3.0])  # measured on the stored voxels
    _, _, _, resampled = task.score_batch(batch, "resampled")
    assert resampled[0].tolist() == pytest.approx([1.2, 1.5, 1.2])

    probabilities = torch.softmax(task.predict_logits(batch["image"]), 1)[0]
    mask = export_mask(task.to_original_grid(probabilities, batch["image"][0], loader.dataset.transform), "multiclass", ["a", "b"])
    stored = nib.load(msd_root / f"labelsTr/{ids[0]}.nii.gz")
    assert mask.shape == (1, *SHAPE) and mask.dtype == torch.uint8
    assert np.allclose(mask.affine.numpy(), stored.affine, atol=1e-5)
    assert np.array_equal(mask[0].numpy(), np.asarray(stored.dataobj))


def test_coarse_resampling_still_maps_back_onto_the_scan_grid(msd_root, tmp_path):
    dm = data(msd_root, (2.0, 2.0, 2.0), tmp_path)
    loader = dm.test_dataloader()
    batch = next(iter(loader))
    task = perfect_task()
    _, dice, _, _ = task.score_batch(batch, "original", loader.dataset.transform)
    # 2 mm blurs the 1.2 mm axes (and the windowed image between classes), so the stored-grid Dice drops below 1
    assert 0.5 < dice.min().item() and dice.max().item() < 1.0
    probabilities = torch.softmax(task.predict_logits(batch["image"]), 1)[0]
    inverted = task.to_original_grid(probabilities, batch["image"][0], loader.dataset.transform)
    assert inverted.shape[1:] == SHAPE and np.allclose(inverted.affine.numpy(), LSA_AFFINE, atol=1e-5)


def test_original_space_needs_the_chain_that_made_the_batch(msd_root, tmp_path):
    batch = next(iter(data(msd_root, (1.2, 1.5, 1.2), tmp_path).test_dataloader()))
    with pytest.raises(ValueError, match="eval_space: resampled"):
        perfect_task().score_batch(batch, "original", transform=None)


def test_brats_regions_go_back_to_brats_labels():
    regions = torch.zeros(3, 4, 1, 1)
    regions[1] = 1  # WT everywhere
    regions[0, 1:] = 1  # TC
    regions[2, 2:] = 1  # ET
    assert brats_label_map(regions).flatten().tolist() == [2, 1, 4, 4]
    probabilities = regions * 0.9
    assert export_mask(probabilities, "multilabel", ["TC", "WT", "ET"]).flatten().tolist() == [2, 1, 4, 4]
    assert export_mask(probabilities, "multilabel", ["r0", "r1", "r2"]).shape == (3, 4, 1, 1)


def test_writer_refuses_a_folder_it_cannot_write(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    writer = NiftiMaskWriter(output_dir=str(blocker / "masks"))
    with pytest.raises(ValueError, match="cannot be written"):
        writer.setup(trainer=None, pl_module=None, stage="predict")


def test_predict_writes_masks_with_the_scan_geometry(msd_root, tmp_path, monkeypatch):
    """fit one step, then ``segresmamba predict``: one <case_id>.nii.gz per test case, uint8, with the
    input's shape, affine and orientation."""
    monkeypatch.chdir(tmp_path)
    common = [
        "--data", "segresmamba.data.MSDDataModule", "--data.root", str(msd_root), "--data.num_val", "1",
        "--data.spacing", "[2.0, 2.0, 2.0]", "--data.intensity_window", "[0.0, 2.0]", "--data.patch_size", "16",
        "--data.num_samples", "1", "--data.split_file", str(tmp_path / "split.json"),
        "--model.net", "unet", "--model.net_kwargs", '{"channels": [4, 8], "strides": [2], "num_res_units": 0}',
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]
    main(["fit", *common, "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "runs/default/version_0/checkpoints/last.ckpt"
    assert ckpt.is_file()
    main(["predict", *common, "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "masks")])
    written = sorted((tmp_path / "masks").iterdir())
    split = json.loads((tmp_path / "split.json").read_text())
    assert [p.name for p in written] == [f"{case}.nii.gz" for case in sorted(split["val"])]
    for path in written:
        mask, image = nib.load(path), nib.load(msd_root / "imagesTr" / path.name)
        assert mask.shape == image.shape == SHAPE and mask.get_data_dtype() == np.uint8
        assert np.allclose(mask.affine, image.affine) and nib.aff2axcodes(mask.affine) == ("L", "S", "A")
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2}

    # unlabelled images (nnU-Net naming, <case>_0000.nii.gz) instead of the test split
    unlabelled = tmp_path / "imagesTs"
    unlabelled.mkdir()
    shutil.copy(msd_root / "imagesTr" / "lsa_0.nii.gz", unlabelled / "new_scan_0000.nii.gz")
    main(["predict", *common, "--data.predict_dir", str(unlabelled), "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "new")])
    (mask_path,) = (tmp_path / "new").iterdir()
    mask = nib.load(mask_path)
    assert mask_path.name == "new_scan.nii.gz" and mask.shape == SHAPE and np.allclose(mask.affine, LSA_AFFINE)
