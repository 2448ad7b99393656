import ast
import copy
import pickle
from pathlib import Path

import pytest
import torch

import segresmamba.ssm.orientations
from segresmamba.ssm import TriOrientedMamba, param_groups
from segresmamba.ssm.orientations import ORIENTATIONS, orient, orientation_codes, unorient


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("length,nslices", [(24, 4), (24, 6), (60, 5), (7, 7), (1, 1)])
def test_orders_are_permutations_with_inverse(orientation, length, nslices):
    idx = torch.arange(length).view(1, 1, length)
    order = orient(idx, orientation, nslices)
    assert sorted(order.flatten().tolist()) == list(range(length))
    assert torch.equal(unorient(order, orientation, nslices), idx)


def test_slice_order_with_nslices_depth_is_depth_first():
    d, h, w = 4, 3, 5
    idx = torch.arange(d * h * w).view(1, 1, -1)
    order = orient(idx, "slice", d)
    depth_first = torch.arange(d * h * w).view(d, h, w).permute(1, 2, 0).reshape(1, 1, -1)
    assert torch.equal(order, depth_first)


def test_slice_order_rejects_indivisible_length():
    with pytest.raises(ValueError, match="not divisible by nslices=4"):
        orient(torch.zeros(1, 1, 10), "slice", 4)


@pytest.mark.parametrize("nslices", [None, 4])
@pytest.mark.parametrize("residual", [True, False])
def test_every_branch_parameter_gets_a_gradient(nslices, residual):
    layer = TriOrientedMamba(8, nslices=nslices, residual=residual)
    x = torch.randn(2, 8, 4, 4, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} received no gradient"
    assert set(layer.branches) == {f"{o}_scan" for o in ORIENTATIONS}


def test_branches_see_different_orders():
    """Each branch must see its own order: swapping the reverse and forward weights changes the output."""
    layer = TriOrientedMamba(4, residual=False).double()
    x = torch.randn(1, 4, 3, 2, 2, dtype=torch.float64)
    y = layer(x)
    fwd, rev = layer.branches["forward_scan"], layer.branches["reverse_scan"]
    state = {k: v.clone() for k, v in fwd.state_dict().items()}
    fwd.load_state_dict(rev.state_dict())
    rev.load_state_dict(state)
    assert not torch.allclose(layer(x), y)


def test_residual_setting():
    layer = TriOrientedMamba(4, residual=True)
    torch.nn.init.zeros_(layer.out_proj.weight)
    x = torch.randn(1, 4, 2, 2, 2)
    torch.testing.assert_close(layer(x), x)


def test_parameter_count_formula():
    c = 48
    r = 3  # ceil(48 / 16)
    expected = 2 * c + 6 * c * c + 3 * (2 * c * 4 + 2 * c + 2 * c * (r + 32) + r * 2 * c + 2 * c + 32 * c + 2 * c)
    assert sum(p.numel() for p in TriOrientedMamba(c).parameters()) == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 0}, "must be >= 1"),
        ({"dim": 8, "nslices": 0}, "nslices"),
        ({"dim": 8, "scan_backend": "cuda"}, "unknown scan_backend"),
        ({"dim": 8, "orientations": ("forward", "diagonal")}, "orientations"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TriOrientedMamba(**kwargs)


def test_wrong_input_shape():
    with pytest.raises(ValueError, match=r"expects \(B, 8, D, H, W\)"):
        TriOrientedMamba(8)(torch.zeros(1, 4, 2, 2, 2))


def test_orientations_is_a_leaf_module():
    """The token orders are the lowest layer of ssm/: the module imports the standard library and torch only."""
    tree = ast.parse(Path(segresmamba.ssm.orientations.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "." for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__", "torch"}, imported


def test_orientation_codes_are_indices_of_the_names():
    assert orientation_codes(("slice", "forward")) == (ORIENTATIONS.index("slice"), ORIENTATIONS.index("forward"))
    with pytest.raises(ValueError, match=r"unknown orientations \['diagonal'\]"):
        orientation_codes(("forward", "diagonal"))


def test_param_groups_train_A_log_and_D_without_weight_decay():
    """Mamba's convention (Gu & Dao 2023): the scan's A_log and D get no weight decay, every other parameter does.

    One SGD step on zero gradients moves a parameter only through its weight decay."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 1), TriOrientedMamba(4, orientations=("forward", "slice")))
    ssm_names = {n for n, _ in net.named_parameters() if n.rsplit(".", 1)[-1] in ("A_log", "D")}
    assert len(ssm_names) == 4  # two branches, each A_log and D
    for model in (net, copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        groups = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
        assert by_decay == {0.1: set(names.values()) - ssm_names, 0.0: ssm_names}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD(groups, lr=1.0)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        for n, p in model.named_parameters():
            moved = not torch.equal(p, before[n])
            assert moved == (n not in ssm_names and bool(before[n].abs().sum())), n
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(net, -1e-5)
    plain = torch.nn.Linear(2, 2)
    assert param_groups(plain, 1e-5) == [{"params": list(plain.parameters()), "weight_decay": 1e-5}]  # no empty group


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_output_lies_in_memory_as_the_input_map(layout):
    """The residual sum reads x and the layer's output alike (one layout, a vectorised sum), for NCDHW and NDHWC maps;
    the values and gradients are those of the other layout."""
    torch.manual_seed(0)
    layer = TriOrientedMamba(6, scan_backend="torch")
    x = torch.randn(2, 6, 3, 4, 5)
    xs = x.contiguous(memory_format=layout).requires_grad_()
    out = layer._mix(xs, 3, fused=False)
    assert out.shape == (2, 6, 60)
    assert out.reshape(xs.shape).is_contiguous(memory_format=layout)
    y = layer(xs)
    assert y.is_contiguous(memory_format=layout)
    ref_x = x.clone().requires_grad_()
    ref = layer(ref_x) if layout == torch.channels_last_3d else layer(ref_x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(x)
    got = torch.autograd.grad(y, [xs, layer.out_proj.weight], g)
    want = torch.autograd.grad(ref, [ref_x, layer.out_proj.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
