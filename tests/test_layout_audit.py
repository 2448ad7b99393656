"""perf.layout_audit: which ops of a step mix NCDHW and NDHWC maps or read strided ones (CPU)."""

import pytest
import torch
from torch import nn

from perf import layout_audit
from perf.layout_audit import LayoutAudit, layout_of


class MixesLayouts(nn.Module):
    """A residual sum of an NDHWC branch and an NCDHW one: the mix a profile shows as an unvectorised kernel."""

    def forward(self, x):
        return 2 * x.contiguous(memory_format=torch.channels_last_3d) + x


class OneLayout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + x


def test_layout_of_names_dense_layouts_and_strides():
    x = torch.zeros(1, 2, 3, 4, 5)
    assert layout_of(x) == "NCDHW"
    assert layout_of(x.contiguous(memory_format=torch.channels_last_3d)) == "NDHWC"
    assert layout_of(x.transpose(2, 4)) == f"strided {tuple(x.transpose(2, 4).stride())}"
    assert layout_of(torch.zeros(()).expand(1, 2, 3, 4, 5)) == "broadcast"


def test_audit_finds_a_mixed_residual_sum_forward_and_backward():
    torch.manual_seed(0)
    net = MixesLayouts()
    x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    with LayoutAudit(min_elements=1) as audit:
        net(x).square().sum().backward()
    forward = [f for f in audit.calls if f.where == "forward: MixesLayouts" and f.op == "add"]
    assert len(forward) == 1 and set(forward[0].inputs) == {"NDHWC", "NCDHW"}
    assert audit.calls[forward[0]] == 1 and audit.elements[forward[0]] == 4 * 8**3
    assert any(f.where.startswith("backward: ") for f in audit.calls)
    assert torch.nn.modules.module._global_forward_hooks == {}  # the audit's module hooks are gone after it


def test_audit_reads_the_tensors_of_a_list_operand():
    a = torch.randn(1, 2, 4, 4, 4)
    with LayoutAudit(min_elements=1) as audit:
        torch.cat([a, a.contiguous(memory_format=torch.channels_last_3d)], dim=1)
    (finding,) = [f for f in audit.calls if f.op == "cat"]
    assert set(finding.inputs) == {"NCDHW", "NDHWC"} and finding.where == "forward: (outside modules)"


def test_audit_of_one_layout_finds_nothing():
    net = OneLayout()
    x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    with LayoutAudit(min_elements=1) as audit:
        net(x).square().sum().backward()
    assert not audit.calls
    small = LayoutAudit(min_elements=10**6)  # the threshold leaves small maps out
    with small:
        MixesLayouts()(x).sum().backward()
    assert not small.calls


def test_cli_writes_the_report_for_a_suite_model(tmp_path, capsys):
    assert layout_audit.main(["--model", "nnunet", "--patch", "32", "--precision", "fp32", "--channels-last", "--device", "cpu",
                              "--out", str(tmp_path)]) == 0
    text = (tmp_path / "layout_audit_nnunet_brats_channels_last.md").read_text()
    assert text.startswith("# Mixed and strided layouts in a training step of nnunet, brats 32x32x32 b1 fp32, NDHWC")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| M elements")]
    # every row: elements, calls, where the op ran, the op, and the layouts, of which NDHWC is one under channels_last
    assert rows and all(len(r.split(" | ")) == 7 and r.split(" | ")[2].startswith(("`forward: ", "`backward: ")) for r in rows)
    assert any("NDHWC" in r for r in rows)
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'layout_audit_nnunet_brats_channels_last.md'}\n")


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_net"], "unknown model 'no_such_net'"),
    (["--patch", "0", "--device", "cpu"], "--patch must be a positive side"),
])
def test_cli_rejects_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        layout_audit.main([*argv, "--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cli_asks_for_cuda_clearly_without_it(tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available"):
        layout_audit.main(["--device", "cuda", "--out", str(tmp_path)])
