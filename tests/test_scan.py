import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from segresmamba.ssm import scan as scan_mod
from segresmamba.ssm import selective_scan, selective_scan_torch


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence written as plainly as possible: one token at a time."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def random_inputs(b, d, n, length, dtype=torch.float64, full=True):
    g = torch.Generator().manual_seed(b * 1000 + d * 100 + n * 10 + length)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    args = {
        "u": r(b, d, length),
        "delta": r(b, d, length) * 0.5,
        "A": -torch.rand(d, n, generator=g, dtype=dtype) * 3,
        "B": r(b, n, length),
        "C": r(b, n, length),
    }
    if full:
        args.update(D=r(d), z=r(b, d, length), delta_bias=r(d) * 0.3)
    return {k: v.requires_grad_() for k, v in args.items()}


CASES = [
    # batch, channels, d_state, length, segment, chunk
    (1, 4, 16, 1, 16, 4),
    (2, 3, 4, 37, 16, 4),  # length not a multiple of chunk or segment
    (1, 6, 8, 100, 32, 8),
    (3, 2, 5, 64, 64, 64),  # one segment, one chunk
    (2, 5, 16, 203, 64, 16),
]


@pytest.mark.parametrize("b,d,n,length,segment,chunk", CASES)
@pytest.mark.parametrize("softplus", [True, False])
def test_matches_sequential_loop_outputs_and_gradients(b, d, n, length, segment, chunk, softplus):
    args = random_inputs(b, d, n, length)
    y = selective_scan_torch(**args, delta_softplus=softplus, segment=segment, chunk=chunk)
    expected = sequential_scan(**args, delta_softplus=softplus)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-10)
    grad_out = torch.randn_like(y)
    names = list(args)
    got = torch.autograd.grad(y, [args[k] for k in names], grad_out)
    want = torch.autograd.grad(expected, [args[k] for k in names], grad_out)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9, msg=f"gradient of {name}")


def test_optional_arguments_absent():
    args = random_inputs(2, 3, 4, 21, full=False)
    y = selective_scan_torch(**args, segment=8, chunk=4)
    torch.testing.assert_close(y, sequential_scan(**args), rtol=1e-9, atol=1e-10)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in args.values())


def test_float32_and_bfloat16_keep_dtype_and_accuracy():
    args64 = random_inputs(1, 4, 8, 50)
    ref = sequential_scan(**args64, delta_softplus=True)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        args = {k: v.detach().to(dtype) for k, v in args64.items()}
        y = selective_scan_torch(**args, delta_softplus=True, segment=16, chunk=4)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), ref.detach(), rtol=tol, atol=tol * 4)


def test_bad_shapes_named():
    args = random_inputs(1, 4, 8, 10)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_torch(**{**args, "B": args["B"][..., :5]})
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_torch(**{**args, "A": args["A"][:2]})
    with pytest.raises(ValueError, match="multiple of chunk"):
        selective_scan_torch(**args, segment=10, chunk=4)


def test_dispatch_names_and_fallbacks():
    args = {k: v.detach() for k, v in random_inputs(1, 2, 4, 9).items()}
    torch.testing.assert_close(selective_scan(**args, backend="auto"), selective_scan_torch(**args))
    with pytest.raises(ValueError, match="unknown scan_backend 'cuda'.*torch"):
        selective_scan(**args, backend="cuda")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        selective_scan(**args, backend="mamba_ssm")
    assert scan_mod.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_a_trace_runs_the_portable_scan(monkeypatch):
    """fvcore counts MACs through torch.jit.trace; a GPU backend named by the model (Triton fails under the
    tracer) gives way to the torch scan there, recorded as one op either way."""
    args = {k: v.detach() for k, v in random_inputs(1, 2, 4, 9).items()}
    called = []
    monkeypatch.setitem(scan_mod._BACKENDS, "triton", _recording_backend("triton", called))
    monkeypatch.setattr(scan_mod, "resolve_backend", lambda name, device: name)
    selective_scan(**args, backend="triton")
    assert called == ["triton"]
    traced = torch.jit.trace(lambda u: selective_scan(u, *list(args.values())[1:], backend="triton"), (args["u"],), check_trace=False)
    assert called == ["triton"]  # the trace ran the torch scan
    torch.testing.assert_close(traced(args["u"]), selective_scan_torch(**args))


def _recording_backend(name, calls):
    def fn(*a):
        calls.append(name)
        return selective_scan_torch(*a)

    return scan_mod.ScanBackend(name, lambda: fn, cuda_only=True)


def test_auto_on_cuda_falls_back_with_one_warning(monkeypatch):
    def broken():
        raise OSError("selective_scan_cuda.so: undefined symbol: _ZN3c10")

    monkeypatch.setitem(scan_mod._BACKENDS, "mamba_ssm", scan_mod.ScanBackend("mamba_ssm", broken, cuda_only=True))
    monkeypatch.setattr(scan_mod, "AUTO_CUDA_ORDER", ["mamba_ssm", "torch"])
    monkeypatch.setattr(scan_mod, "_warned", set())
    with pytest.warns(UserWarning, match="mamba_ssm.*undefined symbol"):
        assert scan_mod.resolve_backend("auto", torch.device("cuda")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_mod.resolve_backend("auto", torch.device("cuda")) == "torch"  # warned once only


def _sleepy_backend(name, seconds, calls):
    def fn(*a):
        calls.append(name)
        time.sleep(seconds)
        return selective_scan_torch(*a)

    return scan_mod.ScanBackend(name, lambda: fn, cuda_only=True)


def test_auto_measures_the_gpu_backends_once_per_signature(monkeypatch):
    calls = []
    monkeypatch.setitem(scan_mod._BACKENDS, "slow", _sleepy_backend("slow", 0.02, calls))
    monkeypatch.setitem(scan_mod._BACKENDS, "fast", _sleepy_backend("fast", 0.0, calls))
    monkeypatch.setattr(scan_mod, "AUTO_CUDA_ORDER", ["slow", "fast", "torch"])
    monkeypatch.setattr(scan_mod, "_AUTO_CHOICES", {})
    inputs = random_inputs(1, 2, 4, 9)
    args = tuple(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")) + (True,)
    # the measured choice wins over the listed order, with a warm-up and AUTO_REPEATS timed calls each
    assert scan_mod._auto_measured(args) == "fast"
    assert calls.count("slow") == calls.count("fast") == scan_mod.AUTO_REPEATS + 1
    assert scan_mod._auto_measured(args) == "fast" and len(calls) == 2 * (scan_mod.AUTO_REPEATS + 1)  # cached
    (choice,) = scan_mod.auto_choices().values()
    assert choice["backend"] == "fast" and choice["ms"]["slow"] > choice["ms"]["fast"]
    # a new signature (another length, or no gradients) is measured again
    longer = tuple(torch.cat([t, t], -1) if isinstance(t, torch.Tensor) and t.dim() == 3 else t for t in args)
    scan_mod._auto_measured(longer)
    with torch.no_grad():
        scan_mod._auto_measured(args)
    assert len(scan_mod.auto_choices()) == 3
    # the caller's tensors get no gradients from the measurement
    assert all(t.grad is None for t in inputs.values())


def test_measure_fastest_runs_backward_only_with_grad():
    seen = []

    def fn(a):
        seen.append(torch.is_grad_enabled() and a[0].requires_grad)
        return a[0] * 2

    x = (torch.ones(3),)
    scan_mod.measure_fastest({"f": fn}, x, repeats=1)
    with torch.no_grad():
        scan_mod.measure_fastest({"f": fn}, x, repeats=1)
    assert seen == [True, True, False, False]


class _AutocastProbe(torch.autograd.Function):
    """Identity that records whether autocast is on where its forward and its backward run."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        _AutocastProbe.seen.append(("forward", torch.is_autocast_enabled("cpu")))
        return x * 1

    @staticmethod
    def backward(ctx, g):
        _AutocastProbe.seen.append(("backward", torch.is_autocast_enabled("cpu")))
        return g


def test_measure_fastest_runs_the_backward_outside_the_forwards_autocast():
    """A training step's backward runs outside autocast; a measurement under autocast must time the same thing."""
    _AutocastProbe.seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scan_mod.measure_fastest({"f": lambda a: _AutocastProbe.apply(a[0])}, (torch.ones(3),), repeats=1)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is left as it was
    assert _AutocastProbe.seen == [("forward", True), ("backward", False)] * 2


def test_measure_fastest_leaves_out_a_failing_backend(monkeypatch):
    def broken(a):
        raise RuntimeError("triton compilation failed")

    monkeypatch.setattr(scan_mod, "_AUTO_FAILURES", {})
    with pytest.warns(UserWarning, match="'broken' failed.*compilation failed"):
        name, times = scan_mod.measure_fastest({"broken": broken, "ok": lambda a: a[0] * 2}, (torch.ones(3),), repeats=1)
    assert name == "ok" and list(times) == ["ok"]
    # the failure stays listed for the results (a warning alone scrolls past), once, until the choices are reset
    assert scan_mod.auto_failures() == ["broken: RuntimeError: triton compilation failed"]
    with pytest.warns(UserWarning):
        scan_mod.measure_fastest({"broken": broken, "ok": lambda a: a[0] * 2}, (torch.ones(3),), repeats=1)
    assert len(scan_mod.auto_failures()) == 1
    monkeypatch.setattr(scan_mod, "_AUTO_CHOICES", {})
    scan_mod.auto_choices(reset=True)
    assert scan_mod.auto_failures() == []
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="every scan backend failed"):
        scan_mod.measure_fastest({"broken": broken}, (torch.ones(3),), repeats=1)


def test_auto_order_mode_skips_measuring(monkeypatch):
    monkeypatch.setenv("SEGRESMAMBA_SCAN_AUTO", "order")
    assert not scan_mod._measuring_allowed()
    monkeypatch.setenv("SEGRESMAMBA_SCAN_AUTO", "measure")
    assert scan_mod._measuring_allowed()


def test_kernel_time_choices_are_kept_apart_from_eager_ones():
    """A choice made for CUDA-graph replays (timing kernels) is another signature than the eager one."""
    u = torch.randn(1, 4, 16)
    args = (u, torch.rand(1, 4, 16), -torch.rand(4, 2), torch.randn(1, 2, 16), torch.randn(1, 2, 16), None, None, None, False)
    eager = scan_mod._signature(*args)
    assert not scan_mod.timing_kernels_now()
    with scan_mod.timing_kernels():
        with scan_mod.timing_kernels():  # nests
            assert scan_mod.timing_kernels_now()
        replay = scan_mod._signature(*args)
        assert scan_mod.timing_kernels_now()
    assert not scan_mod.timing_kernels_now()
    assert replay != eager and replay[:-1] == eager[:-1]
    assert scan_mod._describe(replay).endswith("(kernel time)") and "kernel" not in scan_mod._describe(eager)
    with pytest.raises(RuntimeError), scan_mod.timing_kernels():
        raise RuntimeError("the block fails")
    assert not scan_mod.timing_kernels_now()  # left on no failure


def test_kernel_timing_on_a_cpu_times_the_wall_clock():
    calls = []

    def fn(a):
        calls.append(1)
        time.sleep(0.01)
        return a[0] * 2

    with scan_mod.timing_kernels():
        _, times = scan_mod.measure_fastest({"f": fn}, (torch.ones(3),), repeats=2)
    assert len(calls) == 3 and times["f"] >= 10  # one warm-up, no sleep kernel on a CPU


@pytest.mark.gpu
def test_kernel_timing_hides_the_host():
    """Inside timing_kernels a call that waits 30 ms on the host and 1 ms on the GPU measures near 1 ms."""
    x = torch.randn(2048, 2048, device="cuda")

    def host_bound(a):
        time.sleep(0.03)
        return a[0] @ a[0]

    _, wall = scan_mod.measure_fastest({"f": host_bound}, (x,), repeats=3)
    with scan_mod.timing_kernels():
        _, kernels = scan_mod.measure_fastest({"f": host_bound}, (x,), repeats=3)
    assert wall["f"] >= 30
    assert kernels["f"] < 10, kernels


def test_import_survives_a_broken_mamba_ssm(tmp_path):
    # a mamba_ssm whose extension fails to load, first on the path
    pkg = tmp_path / "mamba_ssm"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('selective_scan_cuda: undefined symbol')\n")
    code = textwrap.dedent(
        """
        import torch, segresmamba
        from segresmamba.ssm import backend_status, selective_scan
        status = backend_status()
        assert "undefined symbol" in status["mamba_ssm"], status
        assert status["torch"] == "available"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.slow
def test_long_sequence_memory_is_bounded():
    """L = 64^3 tokens, 96 channels, 16 states: fwd + bwd without ever holding a (B, L, D, N) tensor."""
    code = textwrap.dedent(
        """
        import resource, torch
        from segresmamba.ssm import selective_scan_torch
        b, d, n, L = 1, 96, 16, 262144
        g = torch.Generator().manual_seed(0)
        args = [torch.randn(b, d, L, generator=g), torch.randn(b, d, L, generator=g) * 0.5,
                -torch.rand(d, n, generator=g), torch.randn(b, n, L, generator=g), torch.randn(b, n, L, generator=g),
                torch.randn(d, generator=g), torch.randn(b, d, L, generator=g), torch.randn(d, generator=g)]
        args = [a.requires_grad_() for a in args]
        grads = [torch.zeros_like(a) for a in args]  # room for the gradients, allocated up front
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = selective_scan_torch(*args[:7], delta_bias=args[7], delta_softplus=True)
        y.sum().backward()
        assert all(torch.isfinite(a.grad).all() for a in args)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        print(grown)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    one_full_state = 1 * 262144 * 96 * 16 * 4
    assert grown < one_full_state, f"peak memory grew by {grown / 2**30:.2f} GiB"
