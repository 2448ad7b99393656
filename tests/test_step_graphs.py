"""The fastest training mode (whole-step CUDA graphs), channels_last and the deferred loss check.

CPU: refusals, the training step's dispatch, LossWatch, channels_last equal to the default layout, and the
``auto`` choices a capture reuses. GPU: the graphed step computes the eager step's gradients and trains the same,
under both recipes (deep supervision included), fp32 and bf16, and inside a Lightning fit.
"""

import copy
import gc
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from segresmamba.ssm import scan as scan_mod
from segresmamba.step_graphs import StepCudaGraphs, TrainingGraph
from segresmamba.task import LossWatch, SegmentationTask

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"feature_sizes": [8, 16, 32, 64]}


def small_task(net="segresmamba", recipe="paper", side=48, **kwargs) -> SegmentationTask:
    torch.manual_seed(0)
    net_kwargs = SMALL if net == "segresmamba" else {"base_filters": 8, "max_filters": 32}
    return SegmentationTask(net=net, net_kwargs=net_kwargs, in_channels=4, out_channels=3, img_size=side, recipe=recipe, **kwargs)


def batch(side=48, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 4, side, side, side, generator=gen)
    label = (torch.rand(1, 3, side, side, side, generator=gen) > 0.5).float()
    return {"image": image.to(device), "label": label.to(device)}


# ------------------------------------------------------------------------------------------------ CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors raised without CUDA")
def test_step_graphs_need_cuda():
    b = batch()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        TrainingGraph(small_task(), b["image"], b["label"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="StepCudaGraphs needs a CUDA device"):
        StepCudaGraphs().setup(trainer, small_task(), "fit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cli_refuses_step_graphs_without_gpu(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    config = ROOT / "configs" / "callbacks" / "step_graphs.yaml"
    out = subprocess.run([sys.executable, "-m", "segresmamba", "fit", "-c", str(config), "--model.net", "unet"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "StepCudaGraphs callback (configs/callbacks/step_graphs.yaml) needs a GPU" in out.stderr
    assert not (tmp_path / "runs").exists()


class _Trainer:  # what StepCudaGraphs.setup reads of a trainer
    def __init__(self, accumulate=1, callbacks=()):
        self.strategy = type("S", (), {"root_device": torch.device("cuda")})()
        self.accumulate_grad_batches = accumulate
        self.callbacks = list(callbacks)


def test_step_graphs_refuse_accumulation_tom_graphs_and_other_modules():
    from segresmamba.ssm.cuda_graphs import ToMCudaGraphs

    callback = StepCudaGraphs()
    callback.setup(_Trainer(), small_task(), "fit")  # accepted
    callback.setup(_Trainer(accumulate=4), small_task(), "test")  # only a fit captures
    with pytest.raises(ValueError, match="accumulate_grad_batches=4"):
        callback.setup(_Trainer(accumulate=4), small_task(), "fit")
    with pytest.raises(ValueError, match="cannot run together"):
        callback.setup(_Trainer(callbacks=[ToMCudaGraphs()]), small_task(), "fit")
    with pytest.raises(ValueError, match="needs a SegmentationTask"):
        callback.setup(_Trainer(), L.LightningModule(), "fit")


class _StubGraph:
    """Stands in for a TrainingGraph: records the calls the training step routes to it."""

    def __init__(self, task, accept):
        self.task, self.accept, self.calls = task, accept, 0

    def matches(self, image, label):
        return self.accept

    def __call__(self, image, label):
        self.calls += 1
        return self.task._loss(self.task.net(image), label)


@pytest.mark.parametrize("accept", [True, False])
def test_training_step_replays_a_matching_graph_only(accept):
    task = small_task()
    task.step_graph = stub = _StubGraph(task, accept)
    loss = task.training_step(batch(), 0)
    assert stub.calls == (1 if accept else 0) and loss.requires_grad and math.isfinite(loss.item())


@pytest.mark.parametrize("net,recipe", [("segresmamba", "paper"), ("nnunet", "nnunet")])
def test_channels_last_is_the_same_computation(net, recipe):
    side = 48 if net == "segresmamba" else 32
    default = small_task(net, recipe, side)
    nhwc = small_task(net, recipe, side, channels_last=True)
    nhwc.load_state_dict(default.state_dict())
    convs = [p for p in nhwc.net.parameters() if p.dim() == 5]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    b = batch(side)
    for task in (default, nhwc):
        torch.manual_seed(1)
        task.training_step(b, 0).backward()
    for (name, a), (_, c) in zip(default.named_parameters(), nhwc.named_parameters()):
        assert torch.allclose(a.grad, c.grad, rtol=1e-3, atol=1e-6), name
    # evaluation too: sliding-window logits of a volume larger than the patch
    volume = torch.randn(1, 4, side + 16, side, side)
    with torch.no_grad():
        assert torch.allclose(default.eval().predict_logits(volume), nhwc.eval().predict_logits(volume), atol=1e-4)


@pytest.mark.parametrize("fast_norms", [True, "group"])
def test_fast_norms_is_the_same_computation(fast_norms):
    default = small_task()
    fast = small_task(fast_norms=fast_norms)
    assert list(fast.state_dict()) == list(default.state_dict())
    fast.load_state_dict(default.state_dict())
    homes = {type(m).__name__: type(m).__module__ for m in fast.net.modules() if type(m).__name__ in ("GroupNorm", "InstanceNorm3d")}
    assert homes == {"GroupNorm": "segresmamba.models.group_norm",
                     "InstanceNorm3d": "segresmamba.models.group_norm" if fast_norms is True else "torch.nn.modules.instancenorm"}
    b = batch()
    losses = [task.training_step(b, 0) for task in (default, fast)]
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for loss in losses:
        loss.backward()
    for (name, a), (_, c) in zip(default.named_parameters(), fast.named_parameters()):
        assert torch.allclose(a.grad, c.grad, rtol=1e-3, atol=1e-6), name


def test_loss_watch_on_cpu_raises_at_once():
    watch = LossWatch()
    watch.watch(torch.tensor(0.5), 3)
    watch.check(wait=True)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 4"):
        watch.watch(torch.tensor(float("nan")), 4)


def test_training_step_stops_on_a_non_finite_loss():
    task = small_task()
    b = batch()
    b["image"][0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        task.training_step(b, 0)


def test_a_non_finite_loss_outside_a_fit_names_the_callers_step():
    """Without a trainer (the benchmarks' TrainingStep) the step is the caller's count, not Lightning's 0."""
    task = small_task()
    b = batch()
    b["image"][0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"at step 2;"):
        task.training_step(b, 2)


def test_capture_reuses_the_measured_tom_choice(monkeypatch):
    """Inside a capture (no measuring allowed) the ToM layer takes the path its warm-up measured fastest."""
    from segresmamba.ssm.tom import TriOrientedMamba

    layer = TriOrientedMamba(8, scan_backend="auto")
    x = torch.randn(1, 8, 4, 4, 4)
    monkeypatch.setattr(scan_mod, "_measuring_allowed", lambda: False)
    scan_mod.auto_choices(reset=True)
    assert layer._choose_fused(x, 4) is False  # nothing measured: the per-branch path
    description = f"ToM dim 8 x {tuple(x.shape)} float32 nslices 4 +grad"
    scan_mod.record_auto_choice(description, "triton_fused", {"triton_fused": 1.0, "per_branch": 2.0})
    assert layer._choose_fused(x, 4) is True
    with scan_mod.timing_kernels():  # a capture's warm-up times kernels: the eager choice is not its
        assert layer._choose_fused(x, 4) is False
        scan_mod.record_auto_choice(f"{description} (kernel time)", "triton_fused", {"triton_fused": 1.0, "per_branch": 2.0})
        assert layer._choose_fused(x, 4) is True
    scan_mod.auto_choices(reset=True)


def test_capture_reuses_the_measured_scan_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(scan_mod, "_measuring_allowed", lambda: False)
    monkeypatch.setattr(scan_mod, "_call", lambda name, args: calls.append(name))
    u = torch.randn(1, 4, 16)
    args = (u, torch.rand(1, 4, 16), -torch.rand(4, 2), torch.randn(1, 2, 16), torch.randn(1, 2, 16), None, None, None, False)
    scan_mod.auto_choices(reset=True)
    scan_mod._AUTO_CHOICES[scan_mod._signature(*args)] = ("triton", {"triton": 1.0})
    scan_mod.selective_scan(*args, backend="auto")
    scan_mod.auto_choices(reset=True)
    scan_mod.selective_scan(*args, backend="auto")
    assert calls == ["triton", scan_mod.resolve_backend("auto", u.device)]


@pytest.mark.parametrize("fails", [False, True])
def test_capture_casts_the_parameters_in_one_copy_or_warns(fails, monkeypatch):
    """The capture's cast path (on a CPU, its warm-up run by the plain warm-up): the casts are chosen and run once;
    where choosing them fails, a warning names the error and the step keeps autocast's own casts."""
    from segresmamba import step_graphs
    from segresmamba.ssm.cuda_graphs import warm_up

    task = small_task("nnunet", "nnunet", 32)
    module = step_graphs._NetAndLoss(task)
    graph = TrainingGraph.__new__(TrainingGraph)
    b = batch(32)
    graph._image, graph._label = b["image"], b["label"]
    ran = []
    monkeypatch.setattr(step_graphs, "warm_up_apart", lambda pairs, steps, allow_unused=False: ran.extend(
        warm_up(func, args, steps, allow_unused) for func, args in pairs))
    if fails:
        def broken(*args):
            raise RuntimeError("no dispatch here")
        monkeypatch.setattr(step_graphs, "castable_parameters", broken)
        with pytest.warns(UserWarning, match="RuntimeError: no dispatch here"):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                graph._cast_in_one_copy(module, torch.bfloat16)
        assert module.casts is None and not ran
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            graph._cast_in_one_copy(module, torch.bfloat16)
        assert module.casts is not None and len(module.casts) > 0 and ran == [None]


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("net,recipe,channels_last,branchwise", [
    ("segresmamba", "paper", False, False), ("nnunet", "nnunet", False, False), ("segresmamba", "nnunet", True, False),
    ("segresmamba", "paper", False, True),  # every ToM layer's backward branch by branch, in the capture and eagerly
])
def test_step_graph_matches_eager(net, recipe, channels_last, branchwise, autocast, graph_check, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if branchwise:
        # on both sides, so that the comparison is of the graphs alone (as the scan path below): the branch-by-branch
        # backward sums in another order than the all-at-once one, which the fused-ToM tests compare with it
        from segresmamba.ssm.triton import fused_tom

        monkeypatch.setattr(fused_tom, "one_branch_at_a_time", lambda branches, elements, device: branches > 1)
    torch.backends.cudnn.deterministic = True
    side = 48 if net == "segresmamba" else 32
    b = batch(side, "cuda")
    eager = small_task(net, recipe, side, channels_last=channels_last).cuda().train()
    for m in eager.modules():  # one scan path on both sides, so the comparison is of the graphs alone
        if hasattr(m, "scan_backend"):
            m.scan_backend = "triton"
    graphed = copy.deepcopy(eager)
    graphed.step_graph = TrainingGraph(graphed, b["image"], b["label"], torch.bfloat16 if autocast else None)
    assert graphed.step_graph.matches(b["image"], b["label"])
    # under autocast the graphs cast the convolutions' and linear layers' weights in one copy (param_casts)
    assert (len(graphed.step_graph.casts) > 0) if autocast else graphed.step_graph.casts is None

    def grads(task):
        return graph_check.step_grads(task.parameters(), lambda: task.training_step(b, 0), autocast)

    def train(task, data, steps):  # clipped as the nnunet recipe clips
        return graph_check.adam_losses(task.parameters(), lambda: task.training_step(data, 0), steps, autocast, clip_norm=12.0)

    # one step's gradients: the graphs compute what the eager step computes, to within the spread of two eager runs
    (l1, first), (_, second), (_, third), (lg, graph) = grads(eager), grads(eager), grads(eager), grads(graphed)
    assert torch.allclose(lg, l1, rtol=1e-2 if autocast else 1e-4)
    graph_check.assert_within_eager_spread([n for n, _ in eager.named_parameters()], first, [second, third], graph, autocast)
    # training: the graphs read the parameters the optimiser updates in place, and a new batch of the same shape
    want = train(eager, batch(side, "cuda", seed=1), 3)
    got = train(graphed, batch(side, "cuda", seed=1), 3)
    assert got == pytest.approx(want, rel=2e-2 if autocast else 1e-3)
    # another batch shape and evaluation run eagerly and still work
    assert not graphed.step_graph.matches(torch.zeros(2, 4, side, side, side, device="cuda"), torch.zeros(2, 3, side, side, side, device="cuda"))
    assert train(graphed, {k: v.repeat(2, 1, 1, 1, 1) for k, v in b.items()}, 1)[0] > 0
    with torch.no_grad():
        assert graphed.eval().predict_logits(torch.randn(1, 4, side + 16, side, side, device="cuda")).shape[2] == side + 16


@pytest.mark.gpu
def test_loss_watch_defers_the_check_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    watch = LossWatch()
    for step in range(20):  # more steps than slots: the watch never holds more than its slots
        watch.watch(torch.tensor(0.25, device="cuda"), step)
        assert len(watch._pending) <= LossWatch.SLOTS
    watch.watch(torch.tensor(float("inf"), device="cuda"), 20)
    with pytest.raises(FloatingPointError, match=r"\(inf\) at step 20"):
        watch.check(wait=True)


@pytest.mark.gpu
@pytest.mark.parametrize("net,recipe,precision", [("segresmamba", "paper", "bf16-mixed"), ("nnunet", "nnunet", "bf16-mixed"),
                                                  ("segresmamba", "nnunet", "16-mixed"), ("segresmamba", "paper", "16-mixed")])
def test_fit_with_step_graphs(net, recipe, precision, tmp_path):
    """A Lightning fit (validation, checkpoint) with the callback: the graphs are captured and replayed. Under
    16-mixed the GradScaler's scaled loss seeds the backward graph and its unscale and skip run eagerly: by
    Lightning before the clipping of the nnunet recipe, inside the fused Adam step of the paper recipe."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from segresmamba.data.synthetic import SyntheticBraTSDataModule

    side = 48 if net == "segresmamba" else 32
    task = small_task(net, recipe, side)
    data = SyntheticBraTSDataModule(volume_size=side + 16, num_train=4, num_val=1, num_test=1, patch_size=side, recipe=recipe, num_workers=0)
    callback = StepCudaGraphs()
    replays = []
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_epochs=2, callbacks=[callback],
                        limit_train_batches=4, limit_val_batches=1,
                        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, num_sanity_val_steps=0)
    original = TrainingGraph.__call__
    try:
        TrainingGraph.__call__ = lambda self, image, label: replays.append(1) or original(self, image, label)
        trainer.fit(task, datamodule=data)
    finally:
        TrainingGraph.__call__ = original
    assert callback.captured == [1, 4, side, side, side]
    assert len(replays) == 8 and task.step_graph is None  # every step replayed; released at the end of the fit
    assert math.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))
    assert list(tmp_path.rglob("*.ckpt"))


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["paper", "nnunet"])
def test_fit_with_step_graphs_under_ddp(recipe, tmp_path):
    """Two GPUs, DDP, bf16-mixed, through the CLI: every rank captures its graphs; DDP's all-reduce (outside the
    graphs) keeps the ranks' weights equal, so the run's checkpoint loads and tests like any other."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import json

    record = tmp_path / "record.json"
    net_kwargs = '{"feature_sizes": [8, 16, 32, 64]}'
    cmd = [sys.executable, "-m", "segresmamba", "fit", "-c", str(ROOT / "configs/trainer/gpu.yaml"),
           "-c", str(ROOT / "configs/model/segresmamba.yaml"), "-c", str(ROOT / "configs/data/synthetic.yaml"),
           "-c", str(ROOT / "configs/callbacks/step_graphs.yaml"), "--model.net_kwargs", net_kwargs,
           "--data.init_args.recipe", recipe, "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
           "--run_record", str(record)]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(record.read_text())
    assert facts["step_graphs"] == [1, 4, 48, 48, 48]
    fit = facts["fit"]
    assert fit["global_steps"] == 8 and not fit["interrupted"]
    assert all(math.isfinite(r["val/dice_mean"]) for r in fit["val_history"] if r.get("val/dice_mean") is not None)


@pytest.mark.gpu
def test_capture_hands_the_warm_up_cache_back():
    """After the capture the allocator's default pool keeps no segment that no tensor uses: the eager warm-up's
    activations are not held beside the graphs' own pool for the rest of the run."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    task = small_task("segresmamba", "paper").cuda().train()
    b = batch(device="cuda")
    task.step_graph = TrainingGraph(task, b["image"], b["label"], torch.bfloat16)
    default_pool = [seg for seg in torch.cuda.memory_snapshot()
                    if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0) and seg.get("device", 0) == torch.cuda.current_device()]
    assert default_pool  # the parameters
    assert not [seg["total_size"] for seg in default_pool if seg["allocated_size"] == 0]


@pytest.mark.gpu
def test_the_casts_pass_adds_no_eager_step_to_the_captures_memory(monkeypatch):
    """The capture runs the parameters' cast path once eagerly after the warm-up, each on its own side stream. Its
    peak reserved memory stays that of a capture without that pass (within 10 % and 64 MiB): neither pass's cached
    blocks are held beside the other's (they once doubled it, 3.0 -> 6.0 GiB for the BraTS net)."""
    from segresmamba import step_graphs

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")

    def capture_reserved() -> tuple:
        # 96^3: an eager pass's activations outweigh the parameters and the graphs' pool, as in the BraTS net
        task = small_task("segresmamba", "paper", side=96).cuda().train()
        b = batch(96, device="cuda")
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        graph = TrainingGraph(task, b["image"], b["label"], torch.bfloat16)
        reserved = torch.cuda.max_memory_reserved()
        cast = None if graph.casts is None else len(graph.casts)
        del graph, task, b  # nothing of this capture outlives it
        return reserved, cast

    capture_reserved()  # the lazy workspaces and kernels, paid once before either measure
    with_casts, cast = capture_reserved()
    assert cast  # some parameters were cast in one copy
    with monkeypatch.context() as patch:
        patch.setattr(step_graphs.TrainingGraph, "_cast_in_one_copy", lambda self, module, dtype: setattr(module, "casts", None))
        without, cast = capture_reserved()
    assert cast is None
    assert with_casts <= 1.1 * without + 64 * 2**20, (with_casts / 2**20, without / 2**20)


@pytest.mark.gpu
def test_capture_starts_without_the_warm_up(monkeypatch):
    """When the forward's capture begins, nothing of the eager warm-up is alive. Against a warm-up that leaves its
    last pass's gradients referenced, as ``make_graphed_callables``' own does (a copy of every parameter gradient,
    alive through the forward's capture, where the capture's memory peaks), the capture starts at least that much
    lower."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from segresmamba import step_graphs

    enter = torch.cuda.graph.__enter__
    at_capture = []

    def record(self):
        at_capture.append(torch.cuda.memory_allocated())
        return enter(self)

    monkeypatch.setattr(torch.cuda.graph, "__enter__", record)

    def allocated_at_capture() -> int:
        """Bytes allocated when the forward's capture starts, beyond those allocated before the TrainingGraph."""
        task = small_task("segresmamba", "paper").cuda().train()
        b = batch(device="cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        at_capture.clear()
        TrainingGraph(task, b["image"], b["label"], torch.bfloat16)
        return at_capture[0] - before

    allocated_at_capture()  # pays what is allocated once, lazily (workspaces)
    ours = allocated_at_capture()
    kept = []

    def keeping_warm_up(pairs, steps, allow_unused=False):
        torch.cuda.synchronize()
        with torch.cuda.stream(torch.cuda.Stream()):  # a side stream as ours, which allocates that stream's workspaces
            for func, args in pairs:
                params = [p for p in func.parameters() if p.requires_grad]
                for _ in range(steps):
                    grads = torch.autograd.grad(func(*args), params, allow_unused=allow_unused)
                kept.append(grads)
        torch.cuda.synchronize()

    monkeypatch.setattr(step_graphs, "warm_up_apart", keeping_warm_up)
    theirs = allocated_at_capture()
    grad_bytes = sum(p.numel() * p.element_size() for p in small_task("segresmamba", "paper").parameters())
    assert kept and theirs - ours >= grad_bytes, (ours, theirs, grad_bytes)


def test_gradients_come_out_in_their_parameters_layouts():
    """Inside the context, a channels_last_3d conv weight's gradient is channels_last_3d (on the CPU conv3d returns it
    contiguous), so that autograd hands a graph's gradient buffer to .grad without cloning it; outside, as before."""
    from segresmamba.step_graphs import gradients_in_parameter_layouts

    conv = torch.nn.Conv3d(4, 8, 3)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    pointwise = torch.nn.Conv3d(8, 2, 1)  # a 1x1x1 kernel is contiguous in both layouts
    net = torch.nn.Sequential(conv, pointwise)
    x = torch.randn(1, 4, 6, 6, 6)

    def grads():
        return torch.autograd.grad(net(x).square().sum(), list(net.parameters()))

    plain = grads()
    assert not plain[0].is_contiguous(memory_format=torch.channels_last_3d)  # what the hooks are for
    with gradients_in_parameter_layouts(net):
        conformed = grads()
    assert conformed[0].is_contiguous(memory_format=torch.channels_last_3d) and conformed[2].is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(plain, conformed))  # the same values
    assert not grads()[0].is_contiguous(memory_format=torch.channels_last_3d)  # the hooks are gone


@pytest.mark.gpu
def test_forward_replays_before_the_autograd_node_is_built(monkeypatch):
    """A replayed step launches the forward graph first and builds the autograd node over every parameter after, so
    the node's host work overlaps the forward's kernels; the channels-last step takes the loader's NCDHW image as it
    is (the copy into the captured input converts it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from segresmamba import step_graphs

    task = small_task("segresmamba", "paper", channels_last=True).cuda().train()
    b = batch(device="cuda")
    task.step_graph = TrainingGraph(task, b["image"], b["label"], torch.bfloat16)
    order = []
    replay, node = torch.cuda.CUDAGraph.replay, step_graphs._ReplayedStep.forward
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (order.append("replay"), replay(self))[1])
    monkeypatch.setattr(step_graphs._ReplayedStep, "forward", staticmethod(lambda ctx, *a: (order.append("node"), node(ctx, *a))[1]))
    with monkeypatch.context() as inside:
        inside.setattr(torch.Tensor, "contiguous", lambda *a, **k: pytest.fail("the graphed step converted the image itself"))
        loss = task.training_step(b, 0)
    assert order == ["replay", "node"] and loss.grad_fn is not None
    loss.backward()
    assert order == ["replay", "node", "replay"]
    assert all(p.grad is not None for p in task.parameters())


@pytest.mark.gpu
def test_channels_last_replay_hands_its_gradient_buffers_over():
    """With channels_last, a replayed step's conv weight gradients are the graphs' own buffers in the weights' layout:
    autograd hands them to .grad as they are, instead of cloning each one after every replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    task = small_task("segresmamba", "paper", channels_last=True).cuda().train()
    b = batch(device="cuda")
    task.step_graph = TrainingGraph(task, b["image"], b["label"], torch.bfloat16)
    conv_bytes = sum(p.numel() * p.element_size() for p in task.parameters() if p.dim() == 5 and p.shape[2:].numel() > 1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    task.training_step(b, 0).backward()
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert all(p.grad.is_contiguous(memory_format=torch.channels_last_3d) for p in task.parameters() if p.dim() == 5)
    assert grown < conv_bytes / 4, (grown, conv_bytes)
