"""The check of the CPU's bf16 conv3d weight gradient, and the CLI's refusal of a bf16 fit where it fails."""

import math

import pytest
import torch
import torch.nn.functional as F

from segresmamba import cli
from segresmamba.cpu_bf16 import TOLERANCE, bf16_conv3d_weight_grad_error, bf16_fit_refusal
from segresmamba.errors import InputExit


def _conv_in_fp32(x, w, b, stride, padding):
    """A correct conv3d at any dtype: computed in fp32, returned in the input's dtype (autograd rounds the
    gradients back to bf16, as a right bf16 kernel would)."""
    return F.conv3d(x.float(), w.float(), b, stride, padding).to(x.dtype)


def _conv_with_bf16_weight_grad_times(scale: float):
    """A conv3d whose bf16 weight gradient is ``scale`` times the right one: a wrong bf16 kernel."""

    class ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.view_as(w)

        @staticmethod
        def backward(ctx, grad):
            return grad * scale

    def conv(x, w, b, stride, padding):
        return _conv_in_fp32(x, ScaledGrad.apply(w) if w.dtype == torch.bfloat16 else w, b, stride, padding)

    return conv


def test_probe_of_a_correct_conv_sees_bf16_rounding_only():
    error = bf16_conv3d_weight_grad_error(_conv_in_fp32)
    assert 0 < error < TOLERANCE / 5


def test_probe_catches_a_wrong_bf16_weight_gradient():
    assert bf16_conv3d_weight_grad_error(_conv_with_bf16_weight_grad_times(0.5)) == pytest.approx(0.5, abs=0.05)


def test_probe_reports_a_non_finite_gradient_as_nan():
    assert math.isnan(bf16_conv3d_weight_grad_error(_conv_with_bf16_weight_grad_times(float("nan"))))


def test_probe_runs_torch_itself_and_without_autograd_enabled():
    with torch.no_grad():
        error = bf16_conv3d_weight_grad_error()
    assert math.isnan(error) or error >= 0


def _must_not_run():
    raise AssertionError("the probe ran where no bf16 fit was asked for on a CPU")


@pytest.mark.parametrize("precision,on_cpu", [("32-true", True), ("16-mixed", True), ("bf16-mixed", False)])
def test_no_refusal_without_bf16_on_a_cpu(precision, on_cpu):
    assert bf16_fit_refusal(precision, on_cpu, probe=_must_not_run) is None


def test_refusal_names_the_setting_the_error_and_the_fix():
    assert bf16_fit_refusal("bf16-mixed", True, probe=lambda: 0.004) is None
    message = bf16_fit_refusal("bf16-mixed", True, probe=lambda: 1.23)
    assert "trainer.precision bf16-mixed" in message and "off by 1.23" in message and "--trainer.precision 32-true" in message
    assert "not finite" in bf16_fit_refusal("bf16-true", True, probe=lambda: float("nan"))


def test_cli_refuses_a_bf16_fit_on_a_cpu_that_fails_the_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "bf16_fit_refusal", lambda precision, on_cpu: bf16_fit_refusal(precision, on_cpu, probe=lambda: 0.9))
    with pytest.raises(InputExit) as stopped:
        cli.main(["fit", "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed", "--model.net", "unet"])
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "trainer.precision bf16-mixed on this CPU" in lines[0], lines
    assert not (tmp_path / "runs").exists()
