"""SegmentationTask on hand-built logits and labels: activation per task, background, NaN-aware means,
per-case rows, deep supervision.

The network is replaced by an identity, so each "image" is the logits the task reads."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset

from segresmamba.task import SegmentationTask, mirrored

SIDE = 8


def make_task(task: str, channels: int, class_names: list[str], **kwargs) -> SegmentationTask:
    module = SegmentationTask(
        net="unet", net_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0},
        in_channels=channels, out_channels=channels, img_size=SIDE, task=task, class_names=class_names, **kwargs,
    )
    module.net = torch.nn.Identity()
    return module


def regions_case() -> dict:
    """Three overlapping regions (BraTS-like: ET inside TC inside WT), logits +4 inside each, -4 outside."""
    label = torch.zeros(1, 3, SIDE, SIDE, SIDE)
    label[0, 1, 1:7, 1:7, 1:7] = 1  # WT
    label[0, 0, 2:6, 2:6, 2:6] = 1  # TC
    label[0, 2, 3:5, 3:5, 3:5] = 1  # ET
    return {"image": label * 8 - 4, "label": label, "case_id": ["regions"]}


def test_multilabel_scores_each_region_by_its_own_sigmoid():
    module = make_task("multilabel", 3, ["TC", "WT", "ET"])
    ids, dice, hd95, spacing = module.score_batch(regions_case(), "original")
    assert ids == ["regions"]
    assert dice.tolist() == [[1.0, 1.0, 1.0]]  # a softmax over the regions would keep one region per voxel
    assert hd95.tolist() == [[0.0, 0.0, 0.0]] and spacing.tolist() == [[1.0, 1.0, 1.0]]


def test_multiclass_scores_the_argmax_of_negative_logits_and_drops_background():
    module = make_task("multiclass", 3, ["a", "b"])
    label = torch.zeros(1, 1, SIDE, SIDE, SIDE, dtype=torch.long)
    label[0, 0, :4] = 1
    logits = torch.full((1, 3, SIDE, SIDE, SIDE), -6.0)
    logits[:, 0] = -2.0  # background wins where the label is 0
    logits[0, 1, :4] = -1.0  # every logit is negative: a sigmoid > 0.5 would predict nothing here
    ids, dice, hd95, _ = module.score_batch({"image": logits, "label": label, "case_id": ["c"]}, "resampled")
    assert dice.shape == (1, 2)  # background is not scored
    assert dice[0, 0].item() == 1.0 and hd95[0, 0].item() == 0.0
    assert math.isnan(dice[0, 1].item()) and math.isnan(hd95[0, 1].item())  # class b is in no label


def test_swapped_activation_changes_the_scores():
    """The same logits read by the other task's activation give other scores: the activation is the task's."""
    case = regions_case()
    as_classes = make_task("multiclass", 3, ["b", "c"])
    label = case["label"].argmax(1, keepdim=True)  # any class-index label of the same volume
    _, dice, _, _ = as_classes.score_batch({**case, "label": label}, "resampled")
    _, dice_regions, _, _ = make_task("multilabel", 3, ["TC", "WT", "ET"]).score_batch(case, "resampled")
    assert dice_regions.tolist() == [[1.0, 1.0, 1.0]] and not torch.equal(dice, dice_regions[:, 1:])


def test_test_epoch_gives_nan_aware_means_and_per_case_rows():
    module = make_task("multiclass", 3, ["a", "b"])
    items = []
    for case_id, classes, miss in (("both", (1, 2), 0), ("only_a", (1,), 8)):
        label = torch.zeros(1, SIDE, SIDE, SIDE, dtype=torch.long)
        for k in classes:
            label[0, (k - 1) * 4 : k * 4, :4] = k
        logits = F.one_hot(label[0], 3).permute(3, 0, 1, 2).float() * 10
        logits[:, 0, 0, :miss] = torch.tensor([10.0, 0.0, 0.0])[:, None]  # "only_a": 8 voxels of a missed
        items.append({"image": logits, "label": label, "case_id": case_id})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    (results,) = trainer.test(module, dataloaders=DataLoader(Dataset(items), batch_size=1))
    dice_a_only = 2 * 120 / (128 + 120)  # class a: 4 x 4 x 8 voxels, 8 of them missed
    assert results["test/dice_a"] == pytest.approx((1.0 + dice_a_only) / 2)
    assert results["test/dice_b"] == pytest.approx(1.0)  # "only_a" has no b: left out, not counted as 0 or 1
    assert results["test/dice_mean"] == pytest.approx(((1.0 + dice_a_only) / 2 + 1.0) / 2)
    assert results["test/hd95_b"] == 0.0 and results["test/hd95_a"] > 0.0
    rows = module.eval_cases["test"]
    assert [(r["case_id"], r["class"]) for r in rows] == [("both", "a"), ("both", "b"), ("only_a", "a"), ("only_a", "b")]
    assert math.isnan(rows[3]["dice"]) and rows[0]["eval_space"] == "original" and rows[0]["spacing_mm"] == "1x1x1"


def test_deep_supervision_weights_halve_per_level():
    module = make_task("multiclass", 2, ["fg"])
    label = torch.zeros(1, 1, SIDE, SIDE, SIDE, dtype=torch.long)
    label[0, 0, :4] = 1
    good = F.one_hot(label[:, 0], 2).movedim(-1, 1).float() * 10
    outputs = [good, torch.zeros(1, 2, 4, 4, 4), -F.interpolate(good, size=(2, 2, 2))]

    class DeepSupervised(torch.nn.Module):
        def forward(self, image):
            return outputs

    module.net = DeepSupervised()
    loss = module.training_step({"image": torch.zeros(1, 2, SIDE, SIDE, SIDE), "label": label}, 0)
    per_output = [
        module.loss_fn(out, F.interpolate(label.float(), size=out.shape[2:], mode="nearest")) for out in outputs
    ]
    expected = sum(w * term for w, term in zip((4 / 7, 2 / 7, 1 / 7), per_output))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert per_output[2] > per_output[1] > per_output[0]  # the weights decide the value


def test_loss_reads_the_logits_through_the_task_activation():
    """Perfect logits give a near-zero loss only through the task's activation (sigmoid for overlapping
    regions, softmax over classes)."""
    case = regions_case()
    regions = make_task("multilabel", 3, ["TC", "WT", "ET"])
    assert regions.loss_fn(case["image"] * 4, case["label"]).item() < 0.01
    classes = make_task("multiclass", 3, ["b", "c"])
    index = case["label"][:, 1:].sum(1, keepdim=True).long()  # 0 outside WT, 1 in WT only, 2 in TC
    logits = F.one_hot(index[:, 0], 3).movedim(-1, 1).float() * 9 - 10  # all negative: sigmoids stay below 0.5
    assert classes.loss_fn(logits, index).item() < 0.01


def test_eval_space_is_checked():
    with pytest.raises(ValueError, match="eval_space must be 'original' or 'resampled'"):
        make_task("multilabel", 3, ["TC", "WT", "ET"], eval_space="native")


def test_mirrored_averages_the_logits_over_every_mirroring():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)  # an asymmetric kernel: mirroring changes its output
    x = torch.randn(2, 1, 6, 5, 4)
    passes = [net(x)] + [
        torch.flip(net(torch.flip(x, dims)), dims) for dims in ((2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
    ]
    with torch.no_grad():
        torch.testing.assert_close(mirrored(net)(x), torch.stack(passes).mean(0))
        assert not torch.allclose(mirrored(net)(x), net(x), atol=1e-3)


class CountingIdentity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize("recipe,override,passes", [("paper", None, 1), ("nnunet", None, 8), ("nnunet", False, 1), ("paper", True, 8)])
def test_test_and_predict_mirror_by_the_recipe_and_validation_never(recipe, override, passes):
    """nnU-Net predicts with mirroring; the validation that monitors training does not (8 passes against 1)."""
    module = make_task("multilabel", 3, ["TC", "WT", "ET"], recipe=recipe, test_time_mirroring=override)
    module.net = CountingIdentity()
    assert module.recipe_settings.test_time_mirroring == (passes == 8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(Dataset([{k: v[0] for k, v in regions_case().items()}]), batch_size=1)
    (results,) = trainer.test(module, dataloaders=loader)
    assert module.net.calls == passes and results["test/dice_mean"] == 1.0  # an identity is mirror-symmetric
    module.net.calls = 0
    trainer.validate(module, dataloaders=loader)
    assert module.net.calls == 1


def test_fit_reads_no_loss_on_the_host_per_step(monkeypatch):
    """With the progress bar on, a fit converts logged tensors to Python numbers (a host-device synchronisation on
    a GPU) once an epoch, not once a step; the logger and the callbacks still get the step and epoch losses."""
    from lightning.pytorch.trainer.connectors.logger_connector import result

    module = SegmentationTask(net="unet", net_kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0},
                              in_channels=1, out_channels=2, img_size=SIDE, task="multiclass", class_names=["fg"])
    g = torch.Generator().manual_seed(0)
    items = [{"image": torch.randn(1, SIDE, SIDE, SIDE, generator=g),
              "label": (torch.rand(1, SIDE, SIDE, SIDE, generator=g) > 0.5).long()} for _ in range(6)]
    at_steps = []  # the optimiser step count at each conversion
    convert = result.convert_tensors_to_scalars
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda value: at_steps.append(trainer.global_step) or convert(value))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=True,
                        enable_model_summary=False, max_epochs=2, limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(module, train_dataloaders=DataLoader(Dataset(items), batch_size=1))
    assert trainer.global_step == 12
    assert at_steps and set(at_steps) <= {6, 12}, at_steps  # at the two epochs' ends only (a step loss in the bar: every step)
    assert {"train/loss_step", "train/loss_epoch"} <= set(trainer.callback_metrics)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))


@pytest.mark.parametrize("deep", [False, True])
def test_channels_last_training_step_hands_the_loss_ncdhw_logits_and_changes_no_value(deep):
    """With ``channels_last`` the net gets an NDHWC image and returns NDHWC logits; the loss gets them in NCDHW (its
    ops meet the NCDHW label there) and the loss and the gradient are those of the NCDHW task."""
    torch.manual_seed(0)
    label = (torch.rand(1, 1, SIDE, SIDE, SIDE) > 0.5).long()
    image = torch.randn(1, 2, SIDE, SIDE, SIDE)
    seen = {}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 2, 3, padding=1)

        def forward(self, x):
            seen["image_channels_last"] = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
            out = self.conv(x)
            return [out, out[:, :, ::2, ::2, ::2]] if deep else out

    results = []
    for channels_last in (False, True):
        module = make_task("multiclass", 2, ["fg"], channels_last=channels_last)
        torch.manual_seed(1)
        module.net = Net()
        if channels_last:
            module.net.conv.weight.data = module.net.conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        seen_by_loss = []
        module.loss_fn.register_forward_pre_hook(lambda mod, args: seen_by_loss.append(args[0].is_contiguous()))
        loss = module.training_step({"image": image, "label": label}, 0)
        loss.backward()
        assert seen["image_channels_last"] == channels_last and (all(seen_by_loss) or not channels_last)
        results.append((loss.detach(), module.net.conv.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
