import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segresmamba.models import group_norm as gn_mod
from segresmamba.models.group_norm import GroupNorm, GroupNormFunction, group_norm, use_fast_group_norm

SHAPES = [(1, 8, 6, 6, 6), (2, 16, 5, 4, 3), (1, 6, 10)]
CASES = [(shape, groups, affine)
         for shape in SHAPES for groups in (1, 2, shape[1]) for affine in (True, False)]


def _pair(shape, groups, affine, dtype):
    """An nn.GroupNorm and our GroupNorm with the same (random) parameters."""
    ref = nn.GroupNorm(groups, shape[1], affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    ours = GroupNorm(groups, shape[1], affine=affine).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module, x, grad):
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    y = module(x)
    y.backward(grad)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y.detach(), grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape,groups,affine", CASES)
def test_matches_nn_group_norm(shape, groups, affine, dtype, tol):
    ref, ours = _pair(shape, groups, affine, dtype)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    grad = torch.randn(shape, dtype=dtype)
    y_ref, g_ref = _run(ref, x, grad)
    y, g = _run(ours, x, grad)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    assert len(g) == len(g_ref) == (3 if affine else 1)
    for a, b in zip(g, g_ref):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_gradcheck_float64():
    x = torch.randn(2, 4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: GroupNormFunction.apply(x, 2, w, b, 1e-5, None), (x, w, b))
    assert torch.autograd.gradcheck(lambda x: GroupNormFunction.apply(x, 4, None, None, 1e-5, None), (x,))
    # only some inputs needing a gradient
    assert torch.autograd.gradcheck(lambda x: GroupNormFunction.apply(x, 2, w.detach(), b.detach(), 1e-5, None), (x,))
    assert torch.autograd.gradcheck(lambda w: GroupNormFunction.apply(x.detach(), 1, w, b.detach(), 1e-5, None), (w,))


def test_large_mean_small_std_and_eps():
    """Mean/std = 3000: fp32 rounding of x itself dominates; ours is as accurate as nn.GroupNorm (vs fp64)."""
    x = torch.randn(1, 8, 6, 6, 6, dtype=torch.float64) * 1e-2 + 30.0
    grad = torch.randn(x.shape, dtype=torch.float64)
    ref, ours = _pair(x.shape, 2, True, torch.float32)
    exact = copy.deepcopy(ref).double()
    y64, g64 = _run(exact, x.float().double(), grad)  # the same fp32 input values, computed in fp64
    for module in (ref, ours):
        y, g = _run(module, x.float(), grad.float())
        errors = [(a.double() - b).abs().max().item() for a, b in zip([y] + g, [y64] + g64)]
        if module is ref:
            nn_errors = errors
    assert all(e <= 3 * e_nn + 1e-6 for e, e_nn in zip(errors, nn_errors)), (errors, nn_errors)


@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_eps_inside_the_square_root(eps):
    # variance (1e-6) well below eps: the output scale is 1/sqrt(var + eps), as nn.GroupNorm's
    x = torch.randn(1, 8, 3, 3, 3, dtype=torch.float64) * 1e-3 + 0.2
    ref = nn.GroupNorm(2, 8, eps=eps).double()
    ours = GroupNorm(2, 8, eps=eps).double()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
    assert ours(x).abs().max() < 1.0  # far from unit variance: eps is not dropped


@pytest.mark.parametrize("shape,groups", [((1, 8, 6, 6, 6), 2), ((2, 16, 5, 4, 3), 16), ((1, 6, 10), 3)])
def test_bfloat16_input_cpu(shape, groups):
    """bf16 in, bf16 out (CPU contract); fp32 statistics: close to the fp32 reference, at least as close as nn."""
    ref, ours = _pair(shape, groups, True, torch.float32)
    x = (torch.randn(shape) * 2 + 1).to(torch.bfloat16)
    grad = torch.randn(shape).to(torch.bfloat16)
    y_ref, g_ref = _run(ref, x.float(), grad.float())  # exact reference on the same (bf16-valued) data
    y, g = _run(ours, x, grad)
    assert y.dtype == torch.bfloat16 and g[0].dtype == torch.bfloat16
    assert g[1].dtype == g[2].dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2)
    y_nn, _ = _run(ref, x, grad)  # nn.GroupNorm with bf16 input on CPU: bf16 output too
    assert y_nn.dtype == torch.bfloat16
    assert (y.float() - y_ref).abs().max() <= (y_nn.float() - y_ref).abs().max() + 1e-6


def test_fp32_output_for_bf16_input_as_under_cuda_autocast():
    """out_dtype=fp32 (what GroupNorm picks under CUDA autocast): fp32 output, bf16 dx, fp32 dw/db."""
    ref, ours = _pair((2, 8, 4, 4, 4), 4, True, torch.float32)
    x = torch.randn(2, 8, 4, 4, 4).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(2, 8, 4, 4, 4)
    y = GroupNormFunction.apply(x, 4, ours.weight, ours.bias, ours.eps, torch.float32)
    y.backward(grad)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    xr = x.detach().float().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # statistics and output entirely in fp32
    torch.testing.assert_close(x.grad.float(), xr.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


def test_autocast_output_dtype_rule(monkeypatch):
    fake = lambda dev, dtype: types.SimpleNamespace(device=torch.device(dev), dtype=dtype)  # noqa: E731
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: True)
    assert gn_mod._autocast_output_dtype(fake("cuda", torch.bfloat16)) == torch.float32
    assert gn_mod._autocast_output_dtype(fake("cuda", torch.float16)) == torch.float32
    assert gn_mod._autocast_output_dtype(fake("cuda", torch.float64)) == torch.float64  # not autocast-eligible
    assert gn_mod._autocast_output_dtype(fake("cpu", torch.bfloat16)) == torch.bfloat16  # not on CPU's lists
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False)
    assert gn_mod._autocast_output_dtype(fake("cuda", torch.bfloat16)) == torch.bfloat16


def test_cpu_autocast_contract_matches_nn():
    ref, ours = _pair((1, 8, 4, 4, 4), 2, True, torch.float32)
    x = torch.randn(1, 8, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for inp in (x, x.to(torch.bfloat16)):
            y_ref, y = ref(inp), ours(inp)
            assert y.dtype == y_ref.dtype == inp.dtype
            torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_saves_no_full_size_fp32_copy():
    x = torch.randn(1, 8, 6, 6, 6).to(torch.bfloat16).requires_grad_()
    norm = GroupNorm(2, 8)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        GroupNormFunction.apply(x, 2, norm.weight, norm.bias, norm.eps, torch.float32)
    full = [s for s in saved if s[0] == tuple(x.shape)]
    assert full == [(tuple(x.shape), torch.bfloat16)], saved
    assert sorted(s for s in saved if s not in full) == [((1, 2), torch.float32)] * 2 + [((8,), torch.float32)]


def test_channels_last_and_non_contiguous_grad():
    ref, ours = _pair((2, 8, 4, 5, 6), 4, True, torch.float64)
    x = torch.randn(2, 8, 4, 5, 6, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    grad = torch.randn(2, 8, 6, 5, 4, dtype=torch.float64).transpose(2, 4)  # non-contiguous grad_output
    y_ref, g_ref = _run(ref, x, grad)
    y, g = _run(ours, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_state_dict_interchangeable_and_2d_fallback():
    ref = nn.GroupNorm(4, 16)
    ours = GroupNorm(4, 16)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        ours.weight.normal_()
    ref.load_state_dict(ours.state_dict())
    ours2 = GroupNorm(4, 16)
    ours2.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16)  # fewer than 3 dims: F.group_norm
    torch.testing.assert_close(ours2(x), ref(x))
    assert repr(ours) == repr(ref)
    torch.testing.assert_close(group_norm(x.view(3, 16, 1), 4), F.group_norm(x.view(3, 16, 1), 4))


def test_use_fast_group_norm_on_monai_segresnet():
    from monai.networks.nets import SegResNet

    model = SegResNet(spatial_dims=3, init_filters=8, in_channels=2, out_channels=3)
    with torch.no_grad():  # non-trivial affine parameters
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    twin = copy.deepcopy(model)
    params_before = dict(model.named_parameters())
    expected = sum(type(m) is nn.GroupNorm for m in model.modules())
    assert expected > 0
    assert use_fast_group_norm(model) == expected
    assert not any(type(m) is nn.GroupNorm for m in model.modules())
    assert sum(type(m) is GroupNorm for m in model.modules()) == expected
    assert all(params_before[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    assert list(model.state_dict()) == list(twin.state_dict())
    assert use_fast_group_norm(model) == 0

    x = torch.randn(1, 2, 16, 16, 16)
    y, y_ref = model(x), twin(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().mean().backward()
    y_ref.square().mean().backward()
    ref_grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)


def test_use_fast_group_norm_root_and_subclass():
    class MyNorm(nn.GroupNorm):
        pass

    root = nn.GroupNorm(2, 4)
    assert use_fast_group_norm(root) == 1 and type(root) is GroupNorm
    tree = nn.Sequential(MyNorm(2, 4), nn.GroupNorm(1, 4))
    assert use_fast_group_norm(tree) == 1 and type(tree[0]) is MyNorm and type(tree[1]) is GroupNorm


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # F.group_norm's batch-size check
def test_traced_path_uses_aten_group_norm():
    model = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), GroupNorm(2, 8), nn.ReLU())
    x = torch.randn(1, 2, 6, 6, 6)
    traced = torch.jit.trace(model, (x,))
    graph = str(traced.inlined_graph)
    assert "aten::group_norm" in graph
    assert "PythonOp" not in graph
    x2 = torch.randn(1, 2, 6, 6, 6)
    torch.testing.assert_close(traced(x2), model(x2), rtol=1e-5, atol=1e-5)


def test_fvcore_counts_the_same_as_nn():
    fvcore = pytest.importorskip("fvcore.nn")
    ours = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), GroupNorm(2, 8))
    ref = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.GroupNorm(2, 8))
    x = torch.randn(1, 2, 6, 6, 6)
    counts = []
    for m in (ours, ref):
        fca = fvcore.FlopCountAnalysis(m, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts.append((fca.total(), dict(fca.by_operator()), dict(fca.unsupported_ops())))
    assert counts[0] == counts[1]
    assert counts[0][1]["group_norm"] == 5 * x.numel() // 2 * 8


# ----- CUDA (skipped without a GPU) -----


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_cuda_bf16_autocast_matches_nn(in_dtype, layout):
    ref, ours = _pair((2, 16, 8, 8, 8), 4, True, torch.float32)
    ref, ours = ref.cuda(), ours.cuda()
    x = (torch.randn(2, 16, 8, 8, 8, device="cuda") * 2 + 1).to(in_dtype).contiguous(memory_format=layout)
    assert gn_mod._use_kernels(x)
    grad = torch.randn(2, 16, 8, 8, 8, device="cuda")
    outs = []
    for m in (ours, ref):
        xi = x.detach().clone().requires_grad_()
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xi)
        y.backward(grad.to(y.dtype))
        outs.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad))
    (y, dx, dw, db), (y_ref, dx_ref, dw_ref, db_ref) = outs
    assert y.dtype == y_ref.dtype == torch.float32
    assert dx.dtype == dx_ref.dtype == in_dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    tol = 2e-2 if in_dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(db, db_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,groups", [((1, 48, 32, 32, 32), 8), ((2, 16, 5, 4, 3), 16)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_cuda_fp32_matches_nn(shape, groups, layout):
    ref, ours = _pair(shape, groups, True, torch.float32)
    ref, ours = ref.cuda(), ours.cuda()
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).contiguous(memory_format=layout)
    grad = torch.randn(shape, device="cuda")
    y_ref, g_ref = _run(ref, x, grad)
    y, g = _run(ours, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_make_graphed_callables(autocast):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv3d(4, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU()).cuda()
    model = copy.deepcopy(eager)
    assert use_fast_group_norm(model) == 1
    sample = torch.randn(1, 4, 8, 8, 8, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(model, (sample,))
    for step in range(3):
        x = torch.randn(1, 4, 8, 8, 8, device="cuda")
        outs = []
        for m in (graphed, eager):
            xi = x.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
                y = m(xi)
            y.float().square().mean().backward()
            outs.append((y.detach().float(), xi.grad.float()))
        tol = 2e-2 if autocast else 1e-4
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol, msg=name)
            p.grad = q.grad = None


# ------------------------------------------------------------------ instance norm and whole networks


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_instance_norm_matches_torch(affine, dtype, tol):
    from segresmamba.models.group_norm import InstanceNorm3d

    torch.manual_seed(0)
    ref = nn.InstanceNorm3d(6, affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    fast = copy.deepcopy(ref)
    fast.__class__ = InstanceNorm3d
    x = torch.randn(2, 6, 5, 4, 3, dtype=dtype, requires_grad=True)
    xf = x.detach().clone().requires_grad_(True)
    g = torch.randn(2, 6, 5, 4, 3, dtype=dtype)
    y, yf = ref(x), fast(xf)
    assert yf.dtype == y.dtype and torch.allclose(yf, y, atol=tol, rtol=tol)
    y.backward(g)
    yf.backward(g)
    assert torch.allclose(xf.grad, x.grad, atol=tol * 10, rtol=tol * 10)
    if affine:
        assert torch.allclose(fast.weight.grad, ref.weight.grad, atol=tol * 10, rtol=tol * 10)
        assert torch.allclose(fast.bias.grad, ref.bias.grad, atol=tol * 10, rtol=tol * 10)
    # running statistics and unbatched inputs take nn.InstanceNorm3d's own path
    tracked = nn.InstanceNorm3d(6, track_running_stats=True)
    tracked.__class__ = InstanceNorm3d
    tracked(torch.randn(2, 6, 4, 4, 4) + 3.0)
    assert tracked.running_mean.mean() > 0.1  # updated by nn.InstanceNorm3d's own path
    assert fast(xf.detach()[0]).shape == (6, 5, 4, 3)


@pytest.mark.parametrize("net", ["segresmamba", "nnunet"])
def test_use_fast_norms_on_suite_networks(net):
    """Every GroupNorm and InstanceNorm of a suite network switched: same output and gradients, same state dict."""
    import segresmamba
    from segresmamba.models.group_norm import use_fast_norms

    torch.manual_seed(0)
    kwargs = {"feature_sizes": [8, 16, 32, 64]} if net == "segresmamba" else {"base_filters": 8, "max_filters": 32}
    side = 48 if net == "segresmamba" else 32
    ref = segresmamba.create_model(net, 4, 3, side, **kwargs)
    fast = copy.deepcopy(ref)
    switched = use_fast_norms(fast)
    norms = [m for m in ref.modules() if type(m) in (nn.GroupNorm, nn.InstanceNorm3d)]
    assert switched == len(norms) > 0
    assert not [m for m in fast.modules() if type(m) in (nn.GroupNorm, nn.InstanceNorm3d)]
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 4, side, side, side)
    y, yf = ref(x), fast(x)
    assert torch.allclose(yf, y, atol=1e-4, rtol=1e-4)
    y.square().mean().backward()
    yf.square().mean().backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert torch.allclose(b.grad, a.grad, atol=1e-5, rtol=1e-3), name


def test_task_fast_norms_group_switches_the_group_norms_only():
    """``fast_norms="group"`` (the eager choice) switches GroupNorm and leaves InstanceNorm to PyTorch; ``True`` both;
    any other value is refused before the net is built."""
    from segresmamba.models.group_norm import GroupNorm
    from segresmamba.models.group_norm import InstanceNorm3d as FastInstanceNorm3d
    from segresmamba.task import SegmentationTask

    kwargs = {"net_kwargs": {"feature_sizes": [8, 16, 32, 64]}, "img_size": 48}
    by_class = {}
    for setting in (False, "group", True):
        net = SegmentationTask(fast_norms=setting, **kwargs).net
        by_class[setting] = {cls: sum(type(m) is cls for m in net.modules())
                             for cls in (nn.GroupNorm, GroupNorm, nn.InstanceNorm3d, FastInstanceNorm3d)}
    plain = by_class[False]
    assert plain[nn.GroupNorm] > 0 and plain[nn.InstanceNorm3d] > 0 and plain[GroupNorm] == plain[FastInstanceNorm3d] == 0
    assert by_class["group"] == {nn.GroupNorm: 0, GroupNorm: plain[nn.GroupNorm], nn.InstanceNorm3d: plain[nn.InstanceNorm3d],
                                 FastInstanceNorm3d: 0}
    assert by_class[True] == {nn.GroupNorm: 0, GroupNorm: plain[nn.GroupNorm], nn.InstanceNorm3d: 0,
                              FastInstanceNorm3d: plain[nn.InstanceNorm3d]}
    with pytest.raises(ValueError, match="fast_norms must be true, false or 'group', got 'instance'"):
        SegmentationTask(fast_norms="instance", **kwargs)


def test_fast_norms_group_on_the_command_lines():
    from perf import model_step
    from segresmamba.bench.efficiency import parse_args

    base = ["--configs", "spleen", "--models", "unet"]
    assert [parse_args(base + extra).fast_norms for extra in ([], ["--fast-norms"], ["--fast-norms", "group"])] == [False, True, "group"]
    with pytest.raises(SystemExit):
        parse_args(base + ["--fast-norms", "instance"])
    row = type("Row", (), {})
    for setting, text in ((True, "whole-tensor"), ("group", "whole-tensor GroupNorm"), (False, "torch")):
        row.fast_norms = setting
        assert model_step._norms_text(row) == text
    assert "eager_gn" in model_step.MODES


@pytest.mark.gpu
def test_instance_norm_under_cuda_autocast_keeps_bf16():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from segresmamba.models.group_norm import InstanceNorm3d

    ref = nn.InstanceNorm3d(48, affine=True).cuda()
    fast = copy.deepcopy(ref)
    fast.__class__ = InstanceNorm3d
    x = torch.randn(1, 48, 32, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, yf = ref(x), fast(x)
    assert yf.dtype == y.dtype == torch.bfloat16
    assert torch.allclose(yf.float(), y.float(), atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------ the Triton kernels (interpreter on a CPU)


def _interpreting() -> bool:
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def small_kernel_blocks(monkeypatch):
    """Small reduction chunks and blocks, so that a few hundred elements span several programs and a ragged tail."""
    from segresmamba.models import group_norm_kernels as kernels

    monkeypatch.setattr(kernels, "CHUNK", 64)
    monkeypatch.setattr(kernels, "BLOCK", 16)
    monkeypatch.setattr(kernels, "COEFF_BLOCK", 16)
    return kernels


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("shape,groups,affine", [((2, 6, 5, 7, 3), 3, True), ((1, 4, 9, 9, 9), 4, True),
                                                 ((2, 8, 3, 4, 5), 2, False), ((1, 6, 10), 1, True),
                                                 ((1, 2, 12, 12, 12), 1, True)])  # 27 partial sums per channel
def test_kernels_under_interpreter_match_nn(shape, groups, affine, small_kernel_blocks):
    assert gn_mod._use_kernels(torch.zeros(shape))
    ref, ours = _pair(shape, groups, affine, torch.float32)
    x = torch.randn(shape) * 2 + 0.5
    grad = torch.randn(shape)
    y_ref, g_ref = _run(ref, x, grad)
    y, g = _run(ours, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_kernels_under_interpreter_partial_gradients(small_kernel_blocks):
    """Only some inputs needing a gradient (a frozen input, frozen parameters), as gradcheck's cases above."""
    x = torch.randn(2, 6, 4, 5, 6, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    grad = torch.randn(x.shape, dtype=torch.float64)
    for needs in ((True, False, False), (False, True, True), (True, True, False)):
        leaves = [t.clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
        want = [t.clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
        y = GroupNormFunction.apply(leaves[0].float(), 3, leaves[1].float(), leaves[2].float(), 1e-5, None)
        F.group_norm(want[0], 3, want[1], want[2], 1e-5).backward(grad)
        y.backward(grad.float())
        for got, ref in zip(leaves, want):
            assert (got.grad is None) == (ref.grad is None)
            if ref.grad is not None:
                torch.testing.assert_close(got.grad, ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_kernels_under_interpreter_bias_without_weight(small_kernel_blocks):
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    grad = torch.randn(x.shape, dtype=torch.float64)
    xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
    xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
    y = group_norm(xs.float(), 3, None, bs.float())
    # the reference with weight ones: PyTorch's own CPU backward fails for a bias without a weight
    y_ref = F.group_norm(xr, 3, torch.ones(6, dtype=torch.float64), br)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    y.backward(grad.float())
    y_ref.backward(grad)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bs.grad, br.grad, rtol=1e-5, atol=1e-5)


def test_kernel_chunks_must_be_whole_blocks(monkeypatch):
    """A reduction program reads exactly its chunk: a chunk that is not a whole number of blocks is refused."""
    kernels = pytest.importorskip("segresmamba.models.group_norm_kernels")
    monkeypatch.setattr(kernels, "CHUNK", 48)
    monkeypatch.setattr(kernels, "BLOCK", 32)
    with pytest.raises(ValueError, match="CHUNK .48. must be a multiple of BLOCK .32."):
        kernels._reduction_block()
    monkeypatch.setattr(kernels, "CHUNK", 16)
    assert kernels._reduction_block() == 16  # a chunk below one block is read in one


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_kernel_statistics_under_interpreter_keep_precision(small_kernel_blocks):
    """Mean/std = 3000 in fp32: the Welford/Chan statistics err no more than fp32 var_mean (a sum of squares
    would lose the variance entirely), against the same fp32 values in fp64."""
    x = (torch.randn(1, 4, 7, 9, 5, dtype=torch.float64) * 1e-2 + 30.0).float()
    mean, rstd = small_kernel_blocks.group_stats(x, 2, 1e-8)
    var64, mean64 = torch.var_mean(x.double().view(1, 2, -1), dim=-1, correction=0)
    var32, mean32 = torch.var_mean(x.view(1, 2, -1), dim=-1, correction=0)
    rstd64, rstd32 = torch.rsqrt(var64 + 1e-8), torch.rsqrt(var32.double() + 1e-8)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)
    ours, torchs = ((r.double() - rstd64).abs().max() / rstd64.max() for r in (rstd, rstd32))
    assert ours <= max(2 * torchs, 1e-4), (ours, torchs)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_kernels_under_interpreter_bf16_instance_norm(small_kernel_blocks):
    """bf16 in, bf16 out (instance norm keeps its input's dtype), against the fp32 computation of the same input."""
    from segresmamba.models.group_norm import InstanceNorm3d

    x = (torch.randn(1, 6, 10, 10, 3) * 3 + 5).to(torch.bfloat16)
    ref = nn.InstanceNorm3d(6, affine=True)
    fast = copy.deepcopy(ref)
    fast.__class__ = InstanceNorm3d
    grad = torch.randn(x.shape)
    x32 = x.float().requires_grad_()
    xb = x.clone().requires_grad_()
    y_ref, y = ref(x32), fast(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, rtol=0, atol=2e-2)  # one bf16 rounding of values within +-4
    y_ref.backward(grad)
    y.backward(grad.to(torch.bfloat16))
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), x32.grad, rtol=0, atol=5e-2)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("shape,groups,affine", [((2, 6, 5, 7, 3), 3, True), ((1, 12, 6, 6, 6), 12, True),
                                                 ((2, 8, 3, 4, 5), 2, False), ((1, 70, 3, 3, 4), 70, True),
                                                 ((1, 4, 9, 9, 9), 1, True)])  # 70: two channel blocks, one ragged
def test_kernels_under_interpreter_channels_last(shape, groups, affine, small_kernel_blocks):
    """A channels-last map (the suite's ``channels_last`` setting) takes the kernels' ``_cl`` passes, with no copy to
    NCDHW: the output, and dx, keep its layout; values and every gradient match nn.GroupNorm. The grad_output
    arrives contiguous, the other layout, as it can from a following op."""
    x = (torch.randn(shape) * 2 + 0.5).to(memory_format=torch.channels_last_3d)
    assert small_kernel_blocks.is_channels_last(x) and gn_mod._use_kernels(x)
    ref, ours = _pair(shape, groups, affine, torch.float32)
    grad = torch.randn(shape)
    y_ref, g_ref = _run(ref, x.contiguous(), grad)
    xs = x.clone().requires_grad_()
    y = ours(xs)
    y.backward(grad)
    assert y.is_contiguous(memory_format=torch.channels_last_3d) and xs.grad.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    got = [xs.grad] + [p.grad for p in ours.parameters()]
    for a, b in zip(got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channels_last_helper_tells_the_layouts_apart():
    kernels = pytest.importorskip("segresmamba.models.group_norm_kernels")
    x = torch.randn(1, 4, 3, 3, 3)
    assert not kernels.is_channels_last(x)
    assert kernels.is_channels_last(x.to(memory_format=torch.channels_last_3d))
    assert not kernels.is_channels_last(torch.randn(1, 1, 3, 3, 3).to(memory_format=torch.channels_last_3d))  # both
    assert not kernels.is_channels_last(x.transpose(2, 4))
