"""Training recipes: names, the optimiser / schedule / loss they build, and how the task applies them."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from segresmamba.recipes import RECIPES, get_recipe, list_recipes
from segresmamba.recipes.optim import build_loss, build_optimizer, build_scheduler, poly_factor
from segresmamba.ssm import TriOrientedMamba
from segresmamba.task import SegmentationTask


def _tiny_task(**kwargs) -> SegmentationTask:
    settings = dict(net="unet", net_kwargs={"channels": [4, 8, 16, 32, 64]}, in_channels=1, out_channels=3,
                    img_size=16, task="multiclass", class_names=["a", "b"])
    settings.update(kwargs)
    return SegmentationTask(**settings)


def test_recipes_are_named_and_unknown_names_are_refused():
    assert list_recipes() == ["nnunet", "paper"]
    with pytest.raises(ValueError, match="unknown recipe 'nnUNet'.*nnunet, paper"):
        get_recipe("nnUNet")
    with pytest.raises(ValueError, match="unknown recipe"):
        _tiny_task(recipe="fast")


def test_paper_recipe_is_the_papers_protocol():
    r = get_recipe("paper")
    assert (r.augmentation, r.loss, r.optimizer, r.lr, r.weight_decay, r.scheduler) == ("paper", "dice", "adam", 1e-4, 1e-5, "cosine")
    assert r.iterations_per_epoch is None and not r.deep_supervision and r.grad_clip_norm is None
    assert not r.test_time_mirroring


def test_nnunet_recipe_optimiser_is_nnunet_v2s():
    r = get_recipe("nnunet")
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), TriOrientedMamba(2, scan_backend="torch"))
    opt = build_optimizer(r, net)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["lr"] == 1e-2 and opt.defaults["momentum"] == 0.99 and opt.defaults["nesterov"]
    assert r.loss == "dicece" and r.iterations_per_epoch == 250 and r.foreground_oversampling == 0.33
    assert r.deep_supervision and r.grad_clip_norm == 12.0 and r.test_time_mirroring  # nnU-Net predicts mirrored
    # Mamba's convention: the scan's A_log and D are not decayed; everything else gets 3e-5
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 3e-5 for p in g["params"]}
    free = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    scan_constants = [p for n, p in net[1].named_parameters() if n.endswith(("A_log", ".D"))]
    assert len(scan_constants) == 6  # A_log and D of three branches
    assert {id(p) for p in scan_constants} == free
    assert id(net[0].weight) in decayed
    assert len(decayed) + len(free) == sum(1 for p in net.parameters() if p.requires_grad)


def test_poly_schedule_follows_nnunet():
    r = get_recipe("nnunet")
    opt = build_optimizer(r, torch.nn.Linear(2, 2))
    sched = build_scheduler(r, opt, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-2 * (1 - t / 10) ** 0.9 for t in range(10)]
    assert lrs == pytest.approx(expected)
    assert poly_factor(10, 10, 0.9) == 0.0 and poly_factor(12, 10, 0.9) == 0.0


def test_cosine_and_constant_schedules():
    r = get_recipe("paper")
    opt = build_optimizer(r, torch.nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["weight_decay"] == 1e-5
    assert isinstance(build_scheduler(r, opt, total=5), torch.optim.lr_scheduler.CosineAnnealingLR)
    assert build_scheduler(dataclasses.replace(r, scheduler="none"), opt, total=5) is None
    with pytest.raises(ValueError, match="scheduler must be"):
        build_scheduler(dataclasses.replace(r, scheduler="step"), opt, total=5)
    with pytest.raises(ValueError, match="optimizer must be"):
        build_optimizer(dataclasses.replace(r, optimizer="lamb"), torch.nn.Linear(2, 2))


@pytest.mark.parametrize("recipe", ["paper", "nnunet"])
def test_optimiser_keeps_torchs_default_kernels_on_the_cpu(recipe):
    opt = build_optimizer(get_recipe(recipe), torch.nn.Linear(2, 2))
    assert not opt.defaults.get("fused") and not opt.defaults.get("foreach")


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["paper", "nnunet"])
def test_optimiser_is_fused_on_a_gpu_unless_clipped_and_steps_as_the_default(recipe, monkeypatch):
    """On CUDA an unclipped recipe's optimiser runs its fused kernels: the same update as torch's default
    for-each kernels, to float rounding, over a few steps of both weight-decay groups. A clipped one (the
    nnU-Net recipe clips at 12; or the caller's clipping) keeps the default, which Lightning can clip."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from segresmamba.recipes import optim

    r = get_recipe(recipe)
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), TriOrientedMamba(2, scan_backend="torch")).cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    assert bool(build_optimizer(r, nets[0]).defaults["fused"]) == (r.grad_clip_norm is None)
    assert not build_optimizer(r, nets[0], clipped=True).defaults["fused"]
    unclipped = dataclasses.replace(r, grad_clip_norm=None)
    fused = build_optimizer(unclipped, nets[0])
    monkeypatch.setattr(optim, "_fused", lambda kind, groups, clipped: {})
    plain = build_optimizer(unclipped, nets[1])
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randn(2, 1, 8, 8, 8, device="cuda")
    for _ in range(3):
        for net, opt in zip(nets, (fused, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_follows_recipe_and_task():
    assert type(build_loss(get_recipe("paper"), "multilabel")) is DiceLoss
    loss = build_loss(get_recipe("nnunet"), "multiclass")
    assert type(loss) is DiceCELoss
    logits = torch.zeros(1, 3, 4, 4, 4)
    logits[:, 1] = 10.0
    perfect = loss(logits, torch.ones(1, 1, 4, 4, 4))
    wrong = loss(logits, torch.full((1, 1, 4, 4, 4), 2.0))
    assert perfect + 0.3 < wrong


def test_task_takes_recipe_with_overrides():
    task = _tiny_task(recipe="nnunet", lr=3e-3)
    assert task.recipe_settings.name == "nnunet" and task.recipe_settings.lr == 3e-3
    assert task.recipe_settings.optimizer == "sgd" and task.recipe_settings.weight_decay == 3e-5
    assert _tiny_task().recipe_settings == get_recipe("paper")


def test_deep_supervision_follows_recipe_where_the_net_has_heads():
    small = {"spacing": [1.0, 1.0, 1.0], "base_filters": 2, "max_filters": 8}
    kwargs = dict(net="nnunet", net_kwargs=small, img_size=64)
    on = _tiny_task(recipe="nnunet", **kwargs).net.train()
    off = _tiny_task(recipe="paper", **kwargs).net.train()
    x = torch.randn(1, 1, 64, 64, 64)
    assert isinstance(on(x), (list, tuple)) and isinstance(off(x), torch.Tensor)
    # an explicit net setting wins over the recipe
    forced = _tiny_task(recipe="nnunet", net="nnunet", net_kwargs={**small, "deep_supervision": False}, img_size=64)
    assert isinstance(forced.net.train()(x), torch.Tensor)
    # a net without heads trains as it is under the nnunet recipe
    assert isinstance(_tiny_task(recipe="nnunet", img_size=32).net.train()(torch.randn(1, 1, 32, 32, 32)), torch.Tensor)


def test_task_optimiser_and_schedule_interval():
    task = _tiny_task(recipe="nnunet")
    task.trainer = SimpleNamespace(max_steps=-1, max_epochs=7, gradient_clip_val=None)  # type: ignore[assignment]
    config = task.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["lr_scheduler"]["interval"] == "epoch"
    task.trainer = SimpleNamespace(max_steps=40, max_epochs=7, gradient_clip_val=None)  # type: ignore[assignment]
    assert task.configure_optimizers()["lr_scheduler"]["interval"] == "step"


def test_task_tells_the_optimiser_builder_about_a_trainers_clipping(monkeypatch):
    """A trainer's gradient_clip_val reaches build_optimizer, which then keeps the for-each kernels on a GPU."""
    import segresmamba.task as task_module

    seen = []
    monkeypatch.setattr(task_module, "build_optimizer", lambda recipe, module, clipped=False: seen.append(clipped) or torch.optim.SGD(module.parameters(), lr=0.1))
    task = _tiny_task(recipe="paper")
    for clip in (None, 0.0, 1.0):
        task.trainer = SimpleNamespace(max_steps=-1, max_epochs=2, gradient_clip_val=clip)  # type: ignore[assignment]
        task.configure_optimizers()
    assert seen == [False, False, True]


def test_task_clips_gradients_by_the_recipe():
    task = _tiny_task(recipe="nnunet")
    seen = {}
    task.clip_gradients = lambda opt, gradient_clip_val=None, gradient_clip_algorithm=None: seen.update(
        val=gradient_clip_val, algo=gradient_clip_algorithm
    )
    task.configure_gradient_clipping(None)
    assert seen == {"val": 12.0, "algo": "norm"}
    task.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="value")
    assert seen == {"val": 1.0, "algo": "value"}  # a trainer setting wins
    paper = _tiny_task()
    paper.clip_gradients = task.clip_gradients
    paper.configure_gradient_clipping(None)
    assert seen == {"val": None, "algo": None}


def test_every_recipe_has_a_config():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "configs" / "recipe"
    for name in RECIPES:
        config = yaml.safe_load((root / f"{name}.yaml").read_text())
        assert config["data"]["init_args"]["recipe"] == name
