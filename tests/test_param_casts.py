"""The parameters' autocast casts made in one copy (segresmamba.param_casts): which parameters qualify, and that the
network computes with them what autocast's own casts give, bit for bit (CPU autocast; the graphed step's GPU
comparison runs them inside CUDA graphs, tests/test_step_graphs.py)."""

import pytest
import torch
from torch import nn

from segresmamba.param_casts import ParameterCasts, castable_parameters

BF16 = torch.bfloat16


class Toy(nn.Module):
    """A conv and a norm, a conv called twice, a frozen conv weight, and a linear layer whose weight is also read
    by another operator."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1)
        self.norm = nn.InstanceNorm3d(4, affine=True)
        self.shared = nn.Conv3d(4, 4, 1)
        self.frozen = nn.Conv3d(4, 4, 1)
        self.frozen.weight.requires_grad_(False)
        self.read = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.frozen(self.shared(self.shared(self.norm(self.conv(x)))))
        return self.head(self.read(x.mean((2, 3, 4)))) + self.read.weight.sum()


def autocast():
    return torch.autocast("cpu", dtype=BF16, cache_enabled=False)


def test_only_parameters_every_use_of_which_is_a_cast_qualify():
    net, x = Toy(), torch.randn(1, 2, 6, 6, 6)
    with autocast():
        names = castable_parameters(net, lambda: net(x), BF16)
    # the norm's are not a stock module's, shared runs twice, frozen.weight needs no gradient, read.weight is also
    # summed
    assert sorted(names) == sorted(["conv.weight", "conv.bias", "frozen.bias", "read.bias", "head.weight", "head.bias"])


def test_a_module_that_did_not_run_is_left_alone():
    net, x = Toy(), torch.randn(1, 2, 6, 6, 6)
    net.unused = nn.Linear(4, 4)
    with autocast():
        assert not any(name.startswith("unused.") for name in castable_parameters(net, lambda: net(x), BF16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_casts_give_autocasts_values_and_gradients(channels_last):
    torch.manual_seed(0)
    net, x = Toy(), torch.randn(2, 2, 6, 6, 6)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with autocast():
        casts = ParameterCasts(net, castable_parameters(net, lambda: net(x), BF16), BF16)

    def step(forward):
        with autocast():
            loss = forward().float().square().mean()
        loss.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        net.zero_grad(set_to_none=True)
        return loss.detach(), grads

    want, got = step(lambda: net(x)), step(lambda: casts.forward(net, x))
    assert torch.equal(want[0], got[0])
    assert want[1].keys() == got[1].keys() and len(got[1]) == 11
    for name, grad in got[1].items():
        assert torch.equal(grad, want[1][name]), name
        assert grad.dtype == torch.float32 and grad.stride() == dict(net.named_parameters())[name].stride(), name


def test_segresmamba_casts_its_convolutions_and_nothing_the_scan_reads():
    from segresmamba.task import SegmentationTask

    task = SegmentationTask(net="segresmamba", net_kwargs={"feature_sizes": [8, 16, 32, 64]}, in_channels=4,
                            out_channels=3, img_size=48)
    x = torch.randn(1, 4, 48, 48, 48)
    with autocast():
        names = set(castable_parameters(task.net, lambda: task.net(x), BF16))
    convs = {f"{m}.weight" for m, module in task.net.named_modules() if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d))}
    assert convs <= names
    assert not [n for n in names if n.endswith(("A_log", ".D")) or "norm" in n or "dt_proj" in n]


def test_bad_arguments_are_named():
    net = Toy()
    with pytest.raises(ValueError, match="not parameters of the network: conv.scale"):
        ParameterCasts(net, ["conv.weight", "conv.scale"], BF16)
    with pytest.raises(ValueError, match="floating-point dtype"):
        ParameterCasts(net, ["conv.weight"], torch.int8)
    assert len(ParameterCasts(net, [], BF16)) == 0
