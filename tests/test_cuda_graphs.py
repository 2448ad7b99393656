"""CUDA graphs of the ToM layers: the CPU-side checks, and (on a GPU) graphed training equal to eager training."""

import copy
import weakref
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import segresmamba
from segresmamba.ssm import cuda_graphs
from segresmamba.ssm.cuda_graphs import ToMCudaGraphs, graph_tom_layers, graphed_tom_layers, release_tom_graphs, tom_input_shapes

SMALL = {"feature_sizes": [8, 16, 32, 64]}


def small_segresmamba(device="cpu"):
    torch.manual_seed(0)
    return segresmamba.create_model("segresmamba", 4, 3, 48, **SMALL).to(device)


def test_tom_input_shapes_in_forward_order_without_side_effects():
    model = small_segresmamba().train()
    state = copy.deepcopy(model.state_dict())
    shapes = tom_input_shapes(model, torch.randn(1, 4, 48, 48, 48))
    assert model.training  # the mode is restored
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no running statistic moved
    # per stage (features 8..64 at 24^3..3^3) its CMMB's two ToM layers: one at half the stage's side, then one at it
    sides = [(8, 12), (8, 24), (16, 6), (16, 12), (32, 3), (32, 6), (64, 2), (64, 3)]
    assert [tuple(s) for _, s, _ in shapes] == [(1, c, r, r, r) for c, r in sides]
    assert len({name for name, _, _ in shapes}) == 8 and all(d == torch.float32 for _, _, d in shapes)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the discovery hooks are gone


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_graphs_need_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        graph_tom_layers(small_segresmamba(), torch.randn(1, 4, 48, 48, 48))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="ToMCudaGraphs needs a CUDA device"):
        ToMCudaGraphs().setup(trainer, None, "fit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cli_callback_config_refused_without_gpu(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    config = Path(__file__).resolve().parents[1] / "configs" / "callbacks" / "cuda_graphs.yaml"
    out = subprocess.run([sys.executable, "-m", "segresmamba", "fit", "-c", str(config), "--model.net", "unet"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "ToMCudaGraphs callback (configs/callbacks/cuda_graphs.yaml) needs a GPU" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_training_matches_eager(autocast, graph_check):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cudnn.deterministic = True
    x = torch.randn(1, 4, 48, 48, 48, device="cuda")
    y = torch.randn(1, 3, 48, 48, 48, device="cuda")
    eager = small_segresmamba("cuda")
    for m in eager.modules():  # one scan path on both sides, so the comparison is of the graphs alone
        if hasattr(m, "scan_backend"):
            m.scan_backend = "triton"
    graphed = copy.deepcopy(eager)
    names = graph_tom_layers(graphed, x, torch.bfloat16 if autocast else None, max_tokens=None)
    assert names == graphed_tom_layers(graphed) and len(names) == 8
    def loss_of(model, x=x):
        return lambda: (model(x).float() - y).square().mean()

    def train_steps(model, x, steps):
        return graph_check.adam_losses(model.parameters(), loss_of(model, x), steps, autocast)

    # one step's gradients: the graphs compute what the eager layers compute, to within the spread of two eager runs
    first, second, graph = (graph_check.step_grads(m.parameters(), loss_of(m), autocast)[1] for m in (eager, eager, graphed))
    graph_check.assert_within_eager_spread([n for n, _ in eager.named_parameters()], first, [second], graph, autocast)
    # then training: the graphs read the parameters the optimizer updates in place. The scan's dB and dC
    # are summed by atomic adds, so two runs differ in the last bits and Adam carries that along.
    want = train_steps(eager, x, 3)
    got = train_steps(graphed, x, 3)
    assert got == pytest.approx(want, rel=1e-2 if autocast else 1e-3)
    assert got[-1] < got[0]
    # another shape, eval mode and no-grad calls run eagerly and still work
    graphed.eval()
    with torch.no_grad():
        assert graphed(torch.randn(1, 4, 96, 96, 96, device="cuda")).shape == (1, 3, 96, 96, 96)
    graphed.train()
    assert train_steps(graphed, torch.randn(2, 4, 48, 48, 48, device="cuda"), 1)[0] > 0
    assert release_tom_graphs(graphed) == names and graphed_tom_layers(graphed) == []


@pytest.mark.gpu
def test_max_tokens_selects_the_small_layers():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = small_segresmamba("cuda")
    names = graph_tom_layers(model, torch.randn(1, 4, 48, 48, 48, device="cuda"), max_tokens=12**3)
    assert len(names) == 7  # the one 24^3 layer is left eager
    with pytest.raises(ValueError, match="already replay CUDA graphs"):
        graph_tom_layers(model, torch.randn(1, 4, 48, 48, 48, device="cuda"), max_tokens=12**3)


def test_expandable_segments_for_the_capture_only(monkeypatch):
    """The capture's pool gets expandable segments; the setting is restored after, and a user's choice is kept."""
    api = cuda_graphs._allocator_settings_api()
    if api is None or api[0] is None:
        pytest.skip("this PyTorch has no runtime getter of the allocator settings")
    getter, setter = api
    for key in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(key, raising=False)
    before = getter()
    try:
        with cuda_graphs.expandable_segments():
            assert "expandable_segments:True" in getter()
        assert "expandable_segments:True" not in getter()
        # the user chose the allocator's settings: the capture leaves them as they are
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
        with cuda_graphs.expandable_segments():
            assert "expandable_segments:True" not in getter()
    finally:
        setter(before or "expandable_segments:False")


def test_expandable_segments_refused_by_the_allocator_leaves_the_capture_running(monkeypatch, caplog):
    def refuse(setting):
        raise RuntimeError("expandable_segments not supported on this platform")

    for key in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(cuda_graphs, "_allocator_settings_api", lambda: (lambda: "", refuse))
    ran = []
    with caplog.at_level("WARNING", logger=cuda_graphs.__name__), cuda_graphs.expandable_segments():
        ran.append(True)
    assert ran == [True] and "keeps the allocator's default segments" in caplog.text


class _Recorded(torch.nn.Module):
    """A small module that keeps a weak reference to every output and input gradient it produced."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)
        self.outputs = []

    def forward(self, x):
        out = self.lin(x).square().sum()
        self.outputs.append(weakref.ref(out))
        return out


def test_warm_up_leaves_nothing_alive_and_no_grad():
    module = _Recorded()
    x = torch.randn(3, 6, requires_grad=True)
    cuda_graphs.warm_up(module, (x,), 3)
    assert len(module.outputs) == 3
    assert all(ref() is None for ref in module.outputs)  # no output (and so no graph or gradient) outlives it
    assert x.grad is None and all(p.grad is None for p in module.parameters())  # torch.autograd.grad, not .backward


def test_make_graphs_captures_after_its_own_warm_up(monkeypatch):
    """The capture is asked for no warm-up of its own, and when it starts none of the warm-up's tensors is alive
    (torch's warm-up keeps its last pass's outputs and gradients through the forward's capture)."""
    seen = {}

    def capture(callables, samples, num_warmup_iters, allow_unused_input):
        seen.update(warmup=num_warmup_iters, alive=[ref() is not None for ref in callables.outputs], unused=allow_unused_input)
        return "graphed"

    class NoStream:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: NoStream())
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    module = _Recorded()
    assert cuda_graphs.make_graphs(module, (torch.randn(3, 6),), 2, allow_unused_input=True) == "graphed"
    assert seen == {"warmup": 0, "alive": [False, False], "unused": True}


def test_warm_up_apart_hands_the_cache_back_before_and_after(monkeypatch):
    """The warm-up runs on a side stream between synchronisations, with the allocator's cache handed back before it
    (the caller's stream's blocks) and after it (its own stream's): neither is held beside the next pass."""
    calls = []

    class SideStream:
        def __enter__(self):
            calls.append("side stream")
            return self

        def __exit__(self, *exc):
            calls.append("back")
            return False

    module = _Recorded()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: SideStream())
    monkeypatch.setattr(cuda_graphs, "warm_up", lambda func, args, steps, allow_unused: calls.append(("warm_up", steps)))
    cuda_graphs.warm_up_apart([(module, (torch.randn(3, 6),))], 2)
    assert calls == ["synchronize", "empty_cache", "side stream", ("warm_up", 2), "back", "synchronize", "empty_cache"]


def test_capture_runs_after_a_collection_with_the_collector_paused(monkeypatch):
    """An unreachable cycle (a dropped TrainingGraph and its task hold each other, and with them CUDA graphs and a
    memory pool) is collected before the capture, and no collection can fall inside it: destroying graphs or giving
    back their memory while another capture records invalidates that capture."""
    import contextlib
    import gc

    class Cycle:
        def __init__(self):
            self.me = self

    freed, seen = [], {}

    def fake_make_graphed_callables(callables, samples, **kwargs):
        seen.update(collector_on=gc.isenabled(), freed_before=list(freed))
        return callables

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    cycle = Cycle()
    weakref.finalize(cycle, freed.append, "cycle")
    del cycle
    assert freed == []  # only the cyclic collector frees it
    assert gc.isenabled()
    func = torch.nn.Linear(2, 2)
    assert cuda_graphs.make_graphs(func, (torch.zeros(1, 2),), warmup=1) is func
    assert seen == {"collector_on": False, "freed_before": ["cycle"]}
    assert gc.isenabled()
