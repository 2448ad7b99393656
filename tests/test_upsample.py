import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segresmamba.models import upsample as up_mod
from segresmamba.models.upsample import TrilinearUpsample2x, TrilinearUpsample2xFunction, use_fast_upsample
from segresmamba.registry import create_model


def _reference(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's trilinear x2 and its input gradient, in float64."""
    x64 = x.detach().double().requires_grad_()
    y = F.interpolate(x64, scale_factor=2, mode="trilinear", align_corners=False)
    y.backward(grad.double())
    return y.detach(), x64.grad


# ----- which modules are switched; the CPU path -----


@pytest.mark.parametrize("module,switched", [
    (nn.Upsample(scale_factor=2, mode="trilinear"), True),
    (nn.Upsample(scale_factor=2.0, mode="trilinear", align_corners=False), True),
    (nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear"), True),
    (nn.Upsample(scale_factor=2, mode="trilinear", align_corners=True), False),
    (nn.Upsample(scale_factor=2, mode="nearest"), False),
    (nn.Upsample(scale_factor=3, mode="trilinear"), False),
    (nn.Upsample(scale_factor=(2, 2, 1), mode="trilinear"), False),
    (nn.Upsample(size=(8, 8, 8), mode="trilinear"), False),
    (nn.Upsample(scale_factor=2, mode="trilinear", recompute_scale_factor=True), False),
])
def test_use_fast_upsample_switches_only_trilinear_x2(module, switched):
    assert use_fast_upsample(nn.Sequential(module)) == int(switched)
    assert (type(module) is TrilinearUpsample2x) == switched


@pytest.mark.parametrize("name,expected", [("segresmamba", 3), ("segresnet", 3), ("nnunet", 0)])
def test_use_fast_upsample_on_suite_nets(name, expected):
    net = create_model(name, 4, 3, (64, 64, 64))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert use_fast_upsample(net) == expected
    assert state.keys() == net.state_dict().keys()


def test_task_switches_its_nets_upsampling():
    """Every net the task builds gets the kernels (SegResMamba's and SegResNet's decoders alike, so the comparison
    between them stays even)."""
    from segresmamba.task import SegmentationTask

    for net in ("segresmamba", "segresnet"):
        task = SegmentationTask(net=net, in_channels=4, out_channels=3, img_size=64)
        kinds = [type(m) for m in task.net.modules() if isinstance(m, nn.Upsample)]
        assert kinds == [TrilinearUpsample2x] * 3, net


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the CPU path without the interpreter")
def test_cpu_falls_back_to_nn_upsample_exactly():
    ref = nn.Upsample(scale_factor=2, mode="trilinear")
    ours = nn.Upsample(scale_factor=2, mode="trilinear")
    use_fast_upsample(ours)
    x = torch.randn(2, 3, 4, 5, 6)
    assert not up_mod._use_kernels(x)
    assert torch.equal(ours(x), ref(x))


def test_kernel_path_only_within_its_limits(monkeypatch):
    """32-bit offsets within a sample and the launch grid's axes: outside them nn.Upsample's own path runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(up_mod, "_kernels", lambda: object())  # Triton present, whatever this machine has
    assert up_mod._use_kernels(torch.empty(2, 3, 4, 4, 4))
    assert not up_mod._use_kernels(torch.empty(2, 3, 4, 4, 4, dtype=torch.float64))
    assert not up_mod._use_kernels(torch.empty(2, 3, 4, 4))
    assert not up_mod._use_kernels(torch.empty(1, 65536, 1, 1, 1))  # one program column per channel (NCDHW)
    assert not up_mod._use_kernels(torch.empty(65536, 1, 1, 1, 1))
    assert not up_mod._use_kernels(torch.empty(1, 1, 1024, 1024, 256, device="meta"))  # 2^31 upsampled voxels


def test_trace_records_aten_upsample(monkeypatch):
    """fvcore counts MACs from a jit trace: the traced graph must hold PyTorch's op, not a Python Function."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernel path would be taken, were it not for the trace
    mod = nn.Upsample(scale_factor=2, mode="trilinear")
    use_fast_upsample(mod)
    graph = torch.jit.trace(mod, torch.randn(1, 2, 4, 4, 4), check_trace=False).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::upsample_trilinear3d" in kinds
    assert not any("PythonOp" in k for k in kinds)


# ----- the Triton kernels (interpreter on a CPU) -----


def _interpreting() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


interpreter = pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")


@pytest.fixture
def small_tiles(monkeypatch):
    """A small tile, so that a few hundred voxels span several programs and channel blocks, with ragged tails."""
    from segresmamba.models import upsample_kernels

    monkeypatch.setattr(upsample_kernels, "TILE", 64)
    return upsample_kernels


@interpreter
@pytest.mark.parametrize("shape,layout", [
    ((2, 3, 3, 4, 5), torch.contiguous_format),
    ((1, 70, 3, 2, 2), torch.channels_last_3d),  # two channel blocks, the second ragged
    ((1, 2, 1, 3, 1), torch.contiguous_format),  # axes of one voxel: both neighbours clamped
    ((2, 5, 1, 7, 3), torch.channels_last_3d),
])
def test_kernels_under_interpreter_match_pytorch(shape, layout, small_tiles):
    x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    assert up_mod._use_kernels(x)
    y = TrilinearUpsample2xFunction.apply(x, torch.float32)
    grad = torch.randn(y.shape)
    y.backward(grad)
    y_ref, dx_ref = _reference(x, grad)
    assert y.shape == y_ref.shape
    # the output keeps the input's layout where the two differ
    assert y.is_contiguous(memory_format=layout)
    assert x.grad.is_contiguous(memory_format=layout)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=1e-6, atol=1e-6)


@interpreter
def test_kernels_under_interpreter_strided_gradient(small_tiles):
    """The output's gradient can arrive with any strides (here a transposed view): the kernel reads it in place."""
    x = torch.randn(1, 4, 3, 4, 5, requires_grad=True)
    y = TrilinearUpsample2xFunction.apply(x, torch.float32)
    grad = torch.randn(1, 4, 10, 8, 6).transpose(2, 4)
    assert grad.shape == y.shape and not grad.is_contiguous()
    y.backward(grad)
    torch.testing.assert_close(x.grad.double(), _reference(x, grad)[1], rtol=1e-6, atol=1e-6)


@interpreter
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_kernels_under_interpreter_bf16(out_dtype, small_tiles):
    """bf16 input is read as it is and computed in fp32; the output in the requested dtype, the gradient in the
    input's."""
    x = torch.randn(2, 5, 3, 4, 3).to(torch.bfloat16).requires_grad_()
    y = TrilinearUpsample2xFunction.apply(x, out_dtype)
    assert y.dtype == out_dtype
    grad = torch.randn(y.shape)
    y.backward(grad.to(out_dtype))
    assert x.grad.dtype == torch.bfloat16
    y_ref, dx_ref = _reference(x, grad.to(out_dtype))
    tol = 1e-6 if out_dtype == torch.float32 else 8e-3  # an fp32 result, or its rounding to bf16
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=8e-3, atol=8e-3)


@interpreter
def test_module_under_interpreter_matches_nn_upsample(small_tiles):
    ref = nn.Upsample(scale_factor=2, mode="trilinear")
    ours = nn.Upsample(scale_factor=2, mode="trilinear")
    use_fast_upsample(ours)
    x = torch.randn(1, 3, 4, 4, 4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    assert ours(x.double()).dtype == torch.float64  # fp64 takes nn.Upsample's path


# ----- CUDA (skipped without a GPU) -----


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_cuda_autocast_matches_nn_upsample(in_dtype, layout):
    """Under bf16 autocast: fp32 out (autocast's policy for upsample_trilinear3d), the gradient in the input's dtype,
    the input's layout kept, values as PyTorch's kernels give them."""
    x = torch.randn(1, 48, 16, 16, 16, device="cuda").to(in_dtype).contiguous(memory_format=layout)
    ref = nn.Upsample(scale_factor=2, mode="trilinear")
    ours = nn.Upsample(scale_factor=2, mode="trilinear")
    use_fast_upsample(ours)
    assert up_mod._use_kernels(x)
    grad = torch.randn(1, 48, 32, 32, 32, device="cuda")
    outs = []
    for m in (ours, ref):
        xi = x.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xi)
        y.backward(grad.to(y.dtype))
        outs.append((y.detach(), xi.grad))
    (y, dx), (y_ref, dx_ref) = outs
    assert y.dtype == y_ref.dtype == torch.float32
    assert dx.dtype == dx_ref.dtype == in_dtype
    assert y.is_contiguous(memory_format=layout) and dx.is_contiguous(memory_format=layout)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    tol = 1e-2 if in_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_cuda_backward_is_deterministic():
    x = torch.randn(1, 96, 16, 16, 16, device="cuda", requires_grad=True)
    grad = torch.randn(1, 96, 32, 32, 32, device="cuda")
    grads = []
    for _ in range(2):
        x.grad = None
        TrilinearUpsample2xFunction.apply(x, torch.float32).backward(grad)
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
