"""segresmamba.metrics on tiny hand-built volumes with known Dice and HD95 (anisotropic voxels)."""

import math

import pytest
import torch
from monai.data import MetaTensor

from segresmamba import metrics

SPACING = (1.2, 1.2, 3.0)


def cube(shift: tuple[int, int, int] = (0, 0, 0), size: int = 10) -> torch.Tensor:
    """(1, 1, size, size, size) 0/1 with a 4-voxel cube at [2:6] shifted by ``shift`` voxels."""
    x = torch.zeros(1, 1, size, size, size)
    a, b, c = (2 + s for s in shift)
    x[0, 0, a : a + 4, b : b + 4, c : c + 4] = 1
    return x


def test_dice_known_values_and_nan_for_an_absent_class():
    label = torch.zeros(1, 2, 4, 4, 4)
    label[0, 0, :2] = 1  # 32 voxels; class 1 absent from the label
    pred = torch.zeros_like(label)
    pred[0, 0, :1] = 1  # 16 voxels, all inside: Dice = 2 * 16 / (32 + 16)
    pred[0, 1, 3] = 1
    dice = metrics.dice_per_class(pred, label)
    assert dice.shape == (1, 2)
    assert dice[0, 0].item() == pytest.approx(2 / 3)
    assert math.isnan(dice[0, 1].item())


def test_hd95_is_in_mm_along_each_axis():
    label = cube()
    # one voxel off along the 3 mm axis, then along a 1.2 mm axis
    assert metrics.hd95_per_class(cube((0, 0, 1)), label, SPACING)[0, 0].item() == pytest.approx(3.0)
    assert metrics.hd95_per_class(cube((1, 0, 0)), label, SPACING)[0, 0].item() == pytest.approx(1.2)
    assert metrics.hd95_per_class(label, label, SPACING)[0, 0].item() == 0.0
    # two voxels off along the 3 mm axis
    assert metrics.hd95_per_class(cube((0, 0, 2)), label, SPACING)[0, 0].item() == pytest.approx(6.0)


def test_hd95_of_empty_prediction_or_label():
    label, empty = cube(), torch.zeros(1, 1, 10, 10, 10)
    diagonal = math.sqrt(12.0**2 + 12.0**2 + 30.0**2)
    assert metrics.hd95_per_class(empty, label, SPACING)[0, 0].item() == pytest.approx(diagonal)
    assert math.isnan(metrics.hd95_per_class(label, empty, SPACING)[0, 0].item())
    assert math.isnan(metrics.hd95_per_class(empty, empty, SPACING)[0, 0].item())
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95_per_class(label, label, (1.0, 1.0))


def test_aggregate_is_nan_aware():
    scores = torch.tensor([[1.0, math.nan, math.nan], [0.5, 0.2, math.nan], [math.nan, 0.4, math.nan]])
    per_class, mean = metrics.aggregate(scores)
    assert per_class[0].item() == pytest.approx(0.75) and per_class[1].item() == pytest.approx(0.3)
    assert math.isnan(per_class[2].item())  # never in any label: left out of the mean
    assert mean == pytest.approx((0.75 + 0.3) / 2)
    per_class, mean = metrics.aggregate(torch.empty(0, 2))
    assert math.isnan(mean) and per_class.shape == (2,)


def test_multilabel_onehot_thresholds_each_sigmoid_at_one_half():
    logits = torch.tensor([2.0, 0.0, -1.0, 3.0]).view(1, 4, 1, 1, 1)  # four regions at one voxel
    mask = metrics.prediction_to_onehot(metrics.activate(logits, "multilabel"), "multilabel")
    assert mask.flatten().tolist() == [1.0, 0.0, 0.0, 1.0]  # overlapping regions both kept; logit 0 is not > 0.5


def test_multiclass_onehot_is_the_argmax_without_background():
    logits = torch.tensor([[-5.0, -3.0, -4.0], [2.0, 1.0, 0.0]]).T.reshape(1, 3, 2, 1, 1)  # two voxels
    mask = metrics.prediction_to_onehot(metrics.activate(logits, "multiclass"), "multiclass")
    assert mask.shape == (1, 2, 2, 1, 1)
    assert mask[0, :, 0].flatten().tolist() == [1.0, 0.0]  # all logits negative: still class 1
    assert mask[0, :, 1].flatten().tolist() == [0.0, 0.0]  # background: no scored class
    label = torch.tensor([1, 0]).view(1, 1, 2, 1, 1)
    assert torch.equal(metrics.label_to_onehot(label, "multiclass", 3), mask)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        metrics.label_to_onehot(torch.full((1, 1, 2, 1, 1), 3), "multiclass", 3)
    with pytest.raises(ValueError, match="3 region channels"):
        metrics.label_to_onehot(torch.zeros(1, 2, 2, 1, 1), "multilabel", 3)


def test_voxel_spacing_and_metric_keys():
    affine = torch.diag(torch.tensor([-1.2, 1.2, 3.0, 1.0], dtype=torch.float64))
    assert metrics.voxel_spacing(MetaTensor(torch.zeros(1, 4, 4, 4), affine=affine)) == pytest.approx(SPACING)
    assert metrics.voxel_spacing(torch.zeros(1, 4, 4, 4)) == (1.0, 1.0, 1.0)
    assert metrics.metric_key("test", "hd95", "CSF/other") == "test/hd95_CSF_other"
