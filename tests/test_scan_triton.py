"""The Triton selective scan against the float64 sequential oracle.

CPU (default CI): the three-pass chunked algorithm itself, in plain PyTorch with the kernels' explicit
backward formulas, must equal the oracle and its autograd gradients; the backend registers without
Triton or CUDA, without importing Triton. GPU (``-m gpu``): the kernels, fp32 and bf16, many shapes, strided inputs, the ToM layer.
With ``TRITON_INTERPRET=1`` and Triton installed, the kernels also run on CPU through Triton's
interpreter (small shapes).
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_scan import sequential_scan

from perf.tom_host import operator_counts
from segresmamba.ssm import scan as scan_mod
from segresmamba.ssm.orientations import orient, unorient
from segresmamba.ssm.scan_torch import selective_scan_torch
from segresmamba.ssm.triton import triton_available, tuning
from segresmamba.ssm.triton.reference import chunked_scan_reference, chunked_scan_reference_backward

HAS_TRITON = triton_available()
if HAS_TRITON:  # the modules that import Triton
    import triton
    import triton.language as tl

    from segresmamba.ssm.triton import autograd as triton_scan
    from segresmamba.ssm.triton import fused_tom
    from segresmamba.ssm.triton.kernels import _softplus

    @triton.jit
    def _softplus_rows(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        """The scan kernels' softplus over a vector (:func:`check_softplus`)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(y_ptr + offs, _softplus(x), mask=offs < n)


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, n, length, softplus=True, full=True, dtype=torch.float64, seed=0):
    """Random inputs of a stable scan: without softplus the steps are kept positive (decay < 1)."""
    g = torch.Generator().manual_seed(seed + b * 7919 + d * 104729 + n * 31 + length)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    delta = r(b, d, length) * 0.5 if softplus else torch.rand(b, d, length, generator=g, dtype=dtype) * 0.3
    args = {
        "u": r(b, d, length),
        "delta": delta,
        "A": -torch.rand(d, n, generator=g, dtype=dtype) * 3 - 0.05,
        "B": r(b, n, length),
        "C": r(b, n, length),
    }
    if full:
        bias = r(d) * 0.3 if softplus else torch.rand(d, generator=g, dtype=dtype) * 0.1
        args.update(D=r(d), z=r(b, d, length), delta_bias=bias)
    return args


def oracle(args, softplus, grad_y):
    """Output and every input gradient in float64 (sequential loop, or the verified torch scan when long)."""
    leaves = {k: v.detach().double().cpu().requires_grad_() for k, v in args.items()}
    if leaves["u"].shape[-1] <= 512:
        y = sequential_scan(**leaves, delta_softplus=softplus)
    else:
        y = selective_scan_torch(**leaves, delta_softplus=softplus)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y.double().cpu())
    return y.detach(), dict(zip(leaves, grads))


def rel_err(got, want, floor=1e-2):
    """||got - want|| / ||want||, the denominator at least ``floor``."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - want).norm() / want.norm().clamp_min(floor)).item()


def within(got, want, rtol, atol):
    """||got - want|| <= rtol ||want|| + atol sqrt(numel): relative, with an absolute floor for gradients
    that vanish exactly (dA at L = 1 is 0, where fp32 leaves a rounding residue of ~1e-7 per element)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.isfinite(got).all(), "non-finite values"
    return (got - want).norm().item() <= rtol * want.norm().item() + atol * want.numel() ** 0.5


# ------------------------------------------------------------------ CPU: the chunked algorithm itself

REFERENCE_CASES = [
    # batch, channels, d_state, length, chunk
    (1, 4, 16, 1, 4),
    (2, 3, 5, 37, 4),  # length not a multiple of the chunk
    (1, 6, 8, 64, 16),  # exact multiple
    (3, 2, 1, 29, 8),
    (2, 5, 16, 50, 64),  # one partial chunk
]


@pytest.mark.parametrize("b,d,n,length,chunk", REFERENCE_CASES)
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("full", [True, False])
def test_chunked_algorithm_matches_oracle(b, d, n, length, chunk, softplus, full):
    args = make_inputs(b, d, n, length, softplus, full)
    grad_y = torch.randn(b, d, length, dtype=torch.float64)
    want_y, want = oracle(args, softplus, grad_y)
    y, entering = chunked_scan_reference(**args, delta_softplus=softplus, chunk=chunk)
    assert entering.shape == (b, d, -(-length // chunk), n)  # only chunk-boundary states are kept
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    grads = chunked_scan_reference_backward(
        *(args.get(k) for k in NAMES[:8]), softplus, grad_y, chunk=chunk
    )
    for name, got in zip(NAMES, grads):
        if name in args:
            torch.testing.assert_close(got, want[name], rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")
        else:
            assert got is None


def test_backend_registers_without_triton_or_cuda():
    assert "triton" in scan_mod.scan_backends()
    assert scan_mod.AUTO_CUDA_ORDER == ["mamba_ssm", "triton", "torch"]  # mamba_ssm measured as fast or faster
    with pytest.raises(ValueError, match="'triton' is taken"):  # registering twice would list it twice in auto
        scan_mod.register_scan_backend("triton", lambda: selective_scan_torch, cuda_only=True)
    assert scan_mod.AUTO_CUDA_ORDER.count("triton") == 1
    if not torch.cuda.is_available():
        assert scan_mod.backend_status()["triton"] != "available"
        with pytest.raises(RuntimeError, match="needs CUDA"):
            scan_mod.resolve_backend("triton", torch.device("cpu"))


def test_import_survives_missing_triton(tmp_path):
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('no triton here')\n")
    code = textwrap.dedent(
        """
        from segresmamba.ssm import backend_status
        from segresmamba.ssm.triton import triton_available
        assert not triton_available()
        assert "triton" in backend_status()["triton"], backend_status()
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_import_loads_no_triton_until_first_use():
    """``import segresmamba`` neither imports Triton nor reads the Triton tuning: a broken tuning setting only
    fails once the Triton path is loaded, and the Triton modules come in on the backend's first use."""
    code = textwrap.dedent(
        """
        import sys
        import segresmamba, segresmamba.ssm
        from segresmamba.ssm import TriOrientedMamba, backend_status
        TriOrientedMamba(4)(__import__("torch").zeros(1, 4, 2, 2, 2))
        loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "segresmamba.ssm.triton.")))
        assert not loaded, loaded
        print("imported", flush=True)
        print(backend_status()["triton"])  # the first use: loads the Triton path, which reads the tuning
        """
    )
    env = {**os.environ, "SEGRESMAMBA_TRITON_SCAN": "{not json"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "imported" in out.stdout, out.stderr
    if HAS_TRITON:
        assert out.returncode != 0 and "ValueError: SEGRESMAMBA_TRITON_SCAN must be a JSON object" in out.stderr, out.stderr
    else:
        assert out.returncode == 0 and "triton is not installed" in out.stdout, out.stderr


# ------------------------------------------------------------------ the kernels (CUDA, or the interpreter)

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON


def _interpreter_index_patch(monkeypatch):
    """numpy >= 2.4 refuses int() of a one-element array, which the Triton 3.6 interpreter uses for loop bounds."""
    import triton.runtime.interpreter as interp

    patch = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)


def _poison_cuda_cache():
    """Fill freed cached blocks with NaN so that an unwritten output element cannot pass."""
    if torch.cuda.is_available():
        torch.empty(64 << 20, device="cuda").fill_(float("nan"))


def check_kernels(device, b, d, n, length, chunk, softplus=True, full=True, dtype=torch.float32, tol=2e-5, strided=False):
    args64 = make_inputs(b, d, n, length, softplus, full, seed=11)
    if dtype != torch.float32:  # the oracle sees the same rounded inputs
        args64 = {k: v.to(dtype).double() if k in ("u", "delta", "B", "C", "z") else v for k, v in args64.items()}
    grad_y = torch.randn(b, d, length, dtype=torch.float64).to(dtype).double()
    want_y, want = oracle(args64, softplus, grad_y)
    args = {}
    for k, v in args64.items():
        v = v.to(device=device, dtype=dtype if k in ("u", "delta", "B", "C", "z") else torch.float32)
        if strided and k in ("u", "z"):  # a channel slice of a wider tensor, as ToM's x/z halves
            v = torch.cat([v, torch.randn_like(v)], dim=1)[:, :d]
        elif strided and k in ("delta", "B", "C"):  # (b, L, c) projected then transposed, as in ToM
            v = v.transpose(1, 2).contiguous().transpose(1, 2)
        args[k] = v.detach().requires_grad_()
    _poison_cuda_cache()
    y = triton_scan.selective_scan_triton(**args, delta_softplus=softplus, chunk=chunk)
    assert y.dtype == dtype and y.shape == (b, d, length)
    _poison_cuda_cache()
    grads = torch.autograd.grad(y, list(args.values()), grad_y.to(device=device, dtype=dtype))
    atol = tol * 0.5  # per element, on values of order 1
    errors = {"y": rel_err(y, want_y)}
    bad = [] if within(y, want_y, tol, atol) else ["y"]
    for (name, leaf), got in zip(args.items(), grads):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        errors[name] = rel_err(got, want[name])
        if not within(got, want[name], tol, atol):
            bad.append(name)
    assert not bad, f"{bad} off by more than rtol {tol} / atol {atol} (relative errors: {errors})"


KERNEL_CASES = [
    # batch, channels, d_state, length, chunk
    (1, 4, 16, 1, 128),  # L = 1
    (2, 3, 5, 37, 16),  # L not a multiple of the chunk, d_state not a power of two
    (1, 96, 16, 1000, 128),
    (3, 8, 16, 2000, 16),  # 125 chunks: the carry crosses several of its blocks
    (2, 7, 8, 300, 32),  # prime channel count
    (4, 24, 16, 4097, 64),
    (1, 2, 1, 130, 64),  # d_state 1
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,d,n,length,chunk", KERNEL_CASES)
def test_kernels_fp32(b, d, n, length, chunk):
    check_kernels("cuda", b, d, n, length, chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("b,d,n,length,chunk", [(2, 3, 5, 37, 16), (1, 96, 16, 1000, 128), (1, 4, 16, 1, 128)])
@pytest.mark.parametrize("softplus,full", [(False, True), (True, False), (False, False)])
def test_kernels_fp32_optional_parts(b, d, n, length, chunk, softplus, full):
    check_kernels("cuda", b, d, n, length, chunk, softplus, full)


@pytest.mark.gpu
@pytest.mark.parametrize("b,d,n,length,chunk", [(1, 96, 16, 1000, 128), (2, 7, 8, 300, 32)])
def test_kernels_strided_inputs(b, d, n, length, chunk):
    check_kernels("cuda", b, d, n, length, chunk, strided=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,d,n,length,chunk", [(1, 96, 16, 1000, 128), (2, 3, 5, 37, 16), (2, 24, 16, 4097, 128), (2, 24, 16, 4097, 64)])
def test_kernels_half_precision(dtype, b, d, n, length, chunk):
    # state and sums in fp32; the error is the rounding of y and of the gradients to 8 (11) bits
    check_kernels("cuda", b, d, n, length, chunk, dtype=dtype, tol=1e-2 if dtype == torch.bfloat16 else 2e-3)


def check_softplus(device):
    """The scans' softplus of the step sizes against log(1 + e^x) in float64, relatively: from the far negative
    steps (where 1 + e^x rounds to 1 in fp32, so the formula log(1 + exp(x)) gives 0) through x = 0 to past the
    threshold of 20 where softplus(x) = x is usual."""
    x = torch.cat([torch.linspace(-60, 30, 9001), torch.linspace(-1, 1, 2001), torch.tensor([0.0, -17.5, 20.0, 20.5])])
    x = x.to(device)
    y = torch.empty_like(x)
    _softplus_rows[((x.numel() + 1023) // 1024,)](x, y, x.numel(), BLOCK=1024)
    want = torch.logaddexp(torch.zeros_like(x, dtype=torch.float64), x.double()).cpu()
    rel = ((y.double().cpu() - want).abs() / want).max().item()
    assert rel < 1e-5, rel


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_softplus_under_interpreter():
    check_softplus("cpu")


@pytest.mark.gpu
def test_softplus_on_gpu():
    check_softplus("cuda")


MAMBA_CASES = [
    # batch, channels, d_state, length, softplus, full
    (1, 48, 16, 4096, True, True),  # a ToM branch's shape at 16^3 tokens
    (2, 24, 16, 1000, True, True),
    (2, 7, 8, 300, False, False),  # no D, z or delta bias; positive steps without softplus
]


@pytest.mark.gpu
@pytest.mark.parametrize("b,d,n,length,softplus,full", MAMBA_CASES)
def test_oracle_and_triton_agree_with_mamba_ssm(b, d, n, length, softplus, full):
    """mamba_ssm's ``selective_scan_fn`` (Gu & Dao 2023) on identical fp32 inputs: its output and every
    gradient match the float64 oracle the suite's kernels are tested against, and the Triton scan's."""
    mamba = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    args64 = make_inputs(b, d, n, length, softplus, full, seed=5)
    grad_y = torch.randn(b, d, length, dtype=torch.float64)
    want_y, want = oracle(args64, softplus, grad_y)
    results = {}
    for name, scan in (("mamba_ssm", mamba.selective_scan_fn), ("triton", triton_scan.selective_scan_triton)):
        args = {k: v.to(device="cuda", dtype=torch.float32).requires_grad_() for k, v in args64.items()}
        y = scan(**args, delta_softplus=softplus)
        grads = torch.autograd.grad(y, list(args.values()), grad_y.to(device="cuda", dtype=torch.float32))
        results[name] = (y, dict(zip(args, grads)))
    tol = 1e-4  # fp32 kernels against float64; a different recurrence or gradient would be off by O(1)
    for name, (y, grads) in results.items():
        bad = [] if within(y, want_y, tol, tol / 2) else ["y"]
        bad += [k for k, g in grads.items() if not within(g, want[k], tol, tol / 2)]
        errors = {"y": rel_err(y, want_y), **{k: rel_err(g, want[k]) for k, g in grads.items()}}
        assert not bad, f"{name}: {bad} off the float64 oracle (relative errors {errors})"
    (y_m, g_m), (y_t, g_t) = results["mamba_ssm"], results["triton"]
    assert within(y_t, y_m, 2 * tol, tol) and all(within(g_t[k], g_m[k], 2 * tol, tol) for k in g_m)


@pytest.mark.gpu
def test_long_sequence_matches_torch_scan():
    """64^3 tokens would take the float64 oracle too long; the verified torch scan in fp64 stands in."""
    args = make_inputs(1, 16, 16, 65536, seed=3)
    grad_y = torch.randn(1, 16, 65536, dtype=torch.float64)
    cuda64 = {k: v.cuda().requires_grad_() for k, v in args.items()}
    want_y = selective_scan_torch(**cuda64, delta_softplus=True)
    want = torch.autograd.grad(want_y, list(cuda64.values()), grad_y.cuda())
    cuda32 = {k: v.cuda().float().requires_grad_() for k, v in args.items()}
    y = triton_scan.selective_scan_triton(**cuda32, delta_softplus=True)
    got = torch.autograd.grad(y, list(cuda32.values()), grad_y.cuda().float())
    assert rel_err(y, want_y) < 2e-5
    for name, g, w in zip(cuda32, got, want):
        assert rel_err(g, w) < 5e-5, name


@pytest.mark.gpu
def test_forward_is_deterministic():
    args = {k: v.cuda().float() for k, v in make_inputs(2, 32, 16, 3000).items()}
    y1 = triton_scan.selective_scan_triton(**args, delta_softplus=True)
    y2 = triton_scan.selective_scan_triton(**args, delta_softplus=True)
    assert torch.equal(y1, y2)


@pytest.mark.gpu
def test_tom_layer_triton_matches_torch_backend(monkeypatch):
    from segresmamba.ssm import TriOrientedMamba

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the convs in full fp32 on both sides
    torch.manual_seed(0)
    layer = TriOrientedMamba(16, scan_backend="torch").cuda()
    x = torch.randn(2, 16, 8, 8, 8, device="cuda", requires_grad=True)
    out_torch = layer(x)
    grads_torch = torch.autograd.grad(out_torch.square().sum(), [x, *layer.parameters()])
    layer.scan_backend = "triton"
    out_triton = layer(x)
    grads_triton = torch.autograd.grad(out_triton.square().sum(), [x, *layer.parameters()])
    assert rel_err(out_triton, out_torch) < 1e-5
    for g_triton, g_torch in zip(grads_triton, grads_torch):
        assert rel_err(g_triton, g_torch) < 1e-4
    # the plain scan's auto order: mamba_ssm where it is installed, then triton
    has_mamba = scan_mod._BACKENDS["mamba_ssm"].get() is not None
    assert scan_mod.resolve_backend("auto", x.device) == ("mamba_ssm" if has_mamba else "triton")


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("b,d,n,length,chunk", [(1, 3, 4, 1, 16), (2, 3, 5, 37, 16), (1, 4, 16, 70, 32)])
@pytest.mark.parametrize("softplus,full", [(True, True), (False, False)])
def test_kernels_under_interpreter(b, d, n, length, chunk, softplus, full, monkeypatch):
    _interpreter_index_patch(monkeypatch)
    monkeypatch.setitem(tuning.TUNING, "bwd_mirror", False)  # the dh recurrence as a reverse scan
    check_kernels("cpu", b, d, n, length, chunk, softplus, full)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("b,d,n,length,chunk,softplus,full", [(2, 3, 5, 37, 16, True, True), (1, 4, 16, 70, 32, False, False)])
def test_mirrored_backward_under_interpreter(b, d, n, length, chunk, softplus, full, monkeypatch):
    """The dh recurrence mirrored (the default under Triton < 3.9): a ragged last chunk, d_state not a power of two, and
    the plain scan without softplus, D or z."""
    _interpreter_index_patch(monkeypatch)
    monkeypatch.setitem(tuning.TUNING, "bwd_mirror", True)
    check_kernels("cpu", b, d, n, length, chunk, softplus, full)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("reverse", [False, True])
def test_carry_over_several_blocks_under_interpreter(reverse, monkeypatch):
    """The scan over chunks against a loop: 150 chunks cross three of the carry kernel's 64-chunk blocks, the last one
    partly masked; forward, row k + 1 leaves chunk k; reverse, row k enters chunk k from the right, row nchunks is 0."""
    _interpreter_index_patch(monkeypatch)
    g = torch.Generator().manual_seed(7)
    b, nchunks, d, n = 2, 150, 3, 5
    decay = torch.rand(b, nchunks, d, n, generator=g) * 0.5 + 0.5
    local = torch.randn(b, nchunks, d, n, generator=g)
    got = triton_scan._run_carry(decay, local, reverse)
    want = torch.zeros(b, nchunks + 1, d, n, dtype=torch.float64)
    for k in (range(nchunks - 1, -1, -1) if reverse else range(nchunks)):
        if reverse:
            want[:, k] = decay[:, k].double() * want[:, k + 1] + local[:, k].double()
        else:
            want[:, k + 1] = decay[:, k].double() * want[:, k] + local[:, k].double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_launch_plan_keeps_the_chunks_within_the_grid():
    from segresmamba.ssm.triton.autograd import MAX_CHUNKS, launch_plan

    assert launch_plan(1, 96, 16, 64**3, 64)[:2] == (64, 4096)
    for length in (MAX_CHUNKS * 64, MAX_CHUNKS * 64 + 1, 256**3, 3 * MAX_CHUNKS * 64):
        T, nchunks = launch_plan(1, 96, 16, length, 64)[:2]
        assert nchunks <= MAX_CHUNKS and T * nchunks >= length and T & (T - 1) == 0
    assert launch_plan(1, 96, 16, MAX_CHUNKS * 64 + 1, 64)[0] == 128


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_grid_arithmetic_matches_tritons():
    import triton

    for n in [*range(0, 130), 1000, 1024, 1025, 64**3, 64**3 + 1]:
        assert tuning.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 32, 128):
            assert tuning.cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_launch_plan_is_cached_but_follows_the_settings_and_the_chunk_limit(monkeypatch):
    """The plan is cached per call signature; a change of TUNING or of MAX_CHUNKS is a new plan, not a stale one."""
    from segresmamba.ssm.triton import autograd

    monkeypatch.setitem(tuning.TUNING, "warps", None)  # the heuristic: 4 warps for a 4 x 16 tile
    assert autograd.launch_plan(2, 3, 4, 150, 16) == (16, 10, 4, 1, 4)
    monkeypatch.setitem(tuning.TUNING, "warps", 2)
    assert autograd.launch_plan(2, 3, 4, 150, 16)[4] == 2
    monkeypatch.setitem(tuning.TUNING, "max_group", 3)
    assert autograd.launch_plan(2, 3, 4, 150, 16)[3] == 1  # a 60-program grid still wants one channel per program
    assert autograd.launch_plan(2, 3, 4, 150, 16) is autograd.launch_plan(2, 3, 4, 150, 16)
    monkeypatch.setattr(autograd, "MAX_CHUNKS", 4)
    assert autograd.launch_plan(2, 3, 4, 150, 16)[:2] == (64, 3)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_longer_chunks_past_the_grid_limit_under_interpreter(monkeypatch):
    """With the chunk limit lowered to 4, 150 tokens at 16-token chunks run as 64-token chunks, still exact."""
    from segresmamba.ssm.triton import autograd

    _interpreter_index_patch(monkeypatch)
    monkeypatch.setattr(autograd, "MAX_CHUNKS", 4)
    assert autograd.launch_plan(2, 3, 4, 150, 16)[:2] == (64, 3)
    check_kernels("cpu", 2, 3, 4, 150, 16)


# ------------------------------------------------------------------ several ToM branches in one launch

def check_oriented(device, branches, b, d, n, length, nslices, chunk, tol=2e-5):
    """oriented_scan_triton against unorient(scan(orient(.))) per branch, in float64, output and every gradient."""
    g = torch.Generator().manual_seed(length * 13 + d)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    R = len(branches)
    inputs = {
        "u": r(R, b, d, length), "delta": r(R, b, d, length) * 0.5, "A": -torch.rand(R, d, n, generator=g, dtype=torch.float64) * 3 - 0.05,
        "B": r(R, b, n, length), "C": r(R, b, n, length), "D": r(R, d), "z": r(b, d, length), "delta_bias": r(R, d) * 0.3,
    }
    grad_y = r(R, b, d, length)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    want = []
    for i, o in enumerate(branches):
        def o_(t):
            return orient(t, o, nslices)

        y = selective_scan_torch(
            o_(leaves["u"][i]), o_(leaves["delta"][i]), leaves["A"][i], o_(leaves["B"][i]), o_(leaves["C"][i]),
            leaves["D"][i], o_(leaves["z"]), leaves["delta_bias"][i], delta_softplus=True,
        )
        want.append(unorient(y, o, nslices))
    want_y = torch.stack(want)
    want_grads = torch.autograd.grad(want_y, list(leaves.values()), grad_y)
    args = {k: v.to(device=device, dtype=torch.float32).requires_grad_() for k, v in inputs.items()}
    y = triton_scan.oriented_scan_triton(**args, orientations=branches, nslices=nslices, chunk=chunk)
    grads = torch.autograd.grad(y, list(args.values()), grad_y.to(device=device, dtype=torch.float32))
    bad = [] if within(y, want_y, tol, tol / 2) else ["y"]
    errors = {"y": rel_err(y, want_y)}
    for name, got, exp in zip(args, grads, want_grads):
        errors[name] = rel_err(got, exp)
        if not within(got, exp, tol, tol / 2):
            bad.append(name)
    assert not bad, f"{bad} off (relative errors {errors})"


ORIENTED_CASES = [
    # orientations, batch, channels, d_state, length, nslices, chunk
    (("forward", "reverse", "slice"), 2, 3, 4, 24, 4, 16),
    (("reverse", "slice"), 1, 2, 5, 35, 5, 16),  # length not a multiple of the chunk
    (("slice",), 2, 4, 16, 64, 8, 16),
]


@pytest.mark.parametrize("branches,b,d,n,length,nslices,chunk", ORIENTED_CASES)
def test_states_reorder_in_one_gather_matches_orient(branches, b, d, n, length, nslices, chunk):
    """The B / C reorder the kernels read (one gather, rows ``r * b + i`` in branch r's order) equals ``orient`` per
    branch, its inverse restores the natural order, and a leading axis (dB and dC side by side) is carried along; forward-only
    orders are left in place."""
    autograd = pytest.importorskip("segresmamba.ssm.triton.autograd")
    from segresmamba.ssm.orientations import orientation_codes

    codes = orientation_codes(branches)
    t = torch.randn(2, len(branches) * b, n, length)
    got = autograd._states_in_scan_order(t, codes, b, nslices)
    want = torch.cat([orient(t[:, r * b:(r + 1) * b], o, nslices) for r, o in enumerate(branches)], dim=1)
    assert torch.equal(got, want)
    assert torch.equal(autograd._states_in_scan_order(got, codes, b, nslices, inverse=True), t)
    forward_only = t[0]
    assert autograd._states_in_scan_order(forward_only, (0,) * len(branches), b, nslices) is forward_only  # nothing to reorder


@pytest.mark.gpu
def test_states_reorder_inside_a_cuda_graph_capture_is_right_and_not_cached(monkeypatch):
    """A reorder index first built inside a capture runs in the graph and stays out of the cache (its kernels run only
    at replay); the next eager call builds and caches its own."""
    autograd = pytest.importorskip("segresmamba.ssm.triton.autograd")
    from segresmamba.ssm.orientations import ORIENTATIONS

    monkeypatch.setattr(autograd, "_order_indices", {})
    codes, nslices = (0, 1, 2), 4
    t = torch.randn(3, 5, 64, device="cuda")
    want = torch.cat([orient(t[r:r + 1], o, nslices) for r, o in enumerate(ORIENTATIONS)])
    out = torch.empty_like(t)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(autograd._states_in_scan_order(t, codes, 1, nslices))
    assert autograd._order_indices == {}
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    assert torch.equal(autograd._states_in_scan_order(t, codes, 1, nslices), want)
    assert len(autograd._order_indices) == 1


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("branches,b,d,n,length,nslices,chunk", ORIENTED_CASES)
def test_oriented_scan_under_interpreter(branches, b, d, n, length, nslices, chunk, monkeypatch):
    _interpreter_index_patch(monkeypatch)
    # the reverse-scan formulation for the first case, the mirrored one for the others (both index the orders alike)
    monkeypatch.setitem(tuning.TUNING, "bwd_mirror", (branches, b, d, n, length, nslices, chunk) != ORIENTED_CASES[0])
    check_oriented("cpu", branches, b, d, n, length, nslices, chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("branches,b,d,n,length,nslices,chunk", ORIENTED_CASES + [
    (("forward", "reverse", "slice"), 1, 96, 16, 16 * 16 * 16, 16, 128),
    (("forward", "reverse", "slice"), 2, 48, 16, 8 * 8 * 8 * 8, 8, 64),
])
def test_oriented_scan_kernels(branches, b, d, n, length, nslices, chunk):
    check_oriented("cuda", branches, b, d, n, length, nslices, chunk)


@needs_triton
def test_oriented_scan_rejects_bad_shapes():
    u = torch.zeros(2, 1, 3, 12)
    A = torch.zeros(2, 3, 4)
    BC = torch.zeros(2, 1, 4, 12)
    with pytest.raises(ValueError, match="orientations must name the 2 branches"):
        triton_scan.oriented_scan_triton(u, u, A, BC, BC, None, None, None, ("forward",), 1)
    with pytest.raises(ValueError, match="not divisible by nslices=5"):
        triton_scan.oriented_scan_triton(u, u, A, BC, BC, None, None, None, ("forward", "slice"), 5)
    with pytest.raises(ValueError, match=r"B must have shape \(2, 1, 4, 12\)"):
        triton_scan.oriented_scan_triton(u, u, A, BC[:, :, :2], BC, None, None, None, ("forward", "slice"), 3)


# ------------------------------------------------------------------ the fused ToM path (conv + scans, no copies)

def check_oriented_conv(device, branches, b, d, length, nslices, k=4, tol=1e-5, dtype=torch.float32):
    """The fused conv + SiLU against float64 autograd; x and the output gradient in ``dtype`` (the weights fp32, as
    the fused layer passes them), so that bf16 also checks the pre-activation gradient kept in bf16."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(length + d)
    x64 = torch.randn(b, length, 2 * d, generator=g, dtype=torch.float64)  # as the in_proj output: (b, L, 2d)
    w64 = torch.randn(len(branches), d, k, generator=g, dtype=torch.float64) * 0.5
    c64 = torch.randn(len(branches), d, generator=g, dtype=torch.float64) * 0.1
    gu = torch.randn(len(branches), b, d, length, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x64, w64, c64)]
    xs = leaves[0][..., :d].transpose(1, 2)
    want = torch.stack([
        unorient(F.silu(F.conv1d(orient(xs, o, nslices), leaves[1][i, :, None, :], leaves[2][i], padding=k - 1, groups=d)[..., :length]), o, nslices)
        for i, o in enumerate(branches)
    ])
    want_grads = torch.autograd.grad(want, leaves, gu)
    args = [t.to(device=device, dtype=dt).requires_grad_() for t, dt in zip((x64, w64, c64), (dtype, torch.float32, torch.float32))]
    u = fused_tom.oriented_conv_silu(args[0][..., :d].transpose(1, 2), args[1], args[2], branches, nslices)
    grads = torch.autograd.grad(u, args, gu.to(device=device, dtype=dtype))
    assert within(u, want, tol, tol), rel_err(u, want)
    for name, got, exp in zip(("x", "weight", "bias"), grads, want_grads):
        assert within(got, exp, tol, tol), (name, rel_err(got, exp))


CONV_CASES = [
    (("forward", "reverse", "slice"), 2, 3, 24, 4),
    (("slice", "reverse"), 1, 17, 150, 5),  # channels and tokens not multiples of the blocks
    (("slice", "forward"), 1, 5, 36, 3),  # fewer slices than taps: the kernels' division path
]


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("branches,b,d,length,nslices", CONV_CASES)
def test_oriented_conv_under_interpreter(branches, b, d, length, nslices, monkeypatch):
    _interpreter_index_patch(monkeypatch)
    check_oriented_conv("cpu", branches, b, d, length, nslices)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_oriented_conv_in_bf16_under_interpreter(monkeypatch):
    _interpreter_index_patch(monkeypatch)
    check_oriented_conv("cpu", *CONV_CASES[0], tol=2e-2, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("branches,b,d,length,nslices", CONV_CASES + [(("forward", "reverse", "slice"), 2, 96, 4096, 16)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_oriented_conv_kernels(branches, b, d, length, nslices, dtype, tol):
    check_oriented_conv("cuda", branches, b, d, length, nslices, tol=tol, dtype=dtype)


def check_gate(device, branches, b, d, length, dtype=torch.float32, tol=1e-6):
    """The fused layer's gate against float64 autograd: ``out = silu(z) sum_r y_r``, z a channel-contiguous view of an
    input projection's (b, L, 2 d) output, as the layer hands it over."""
    from segresmamba.ssm.triton.fused_tom import gate_backward, gate_forward

    g = torch.Generator().manual_seed(length + d)
    y = torch.randn(branches * b, d, length, generator=g, dtype=torch.float64)
    xz = torch.randn(b, length, 2 * d, generator=g, dtype=torch.float64)
    grad = torch.randn(b, d, length, generator=g, dtype=torch.float64)
    y64, z64 = y.clone().requires_grad_(), xz[..., d:].transpose(1, 2).clone().requires_grad_()
    ysum64 = y64.view(branches, b, d, length).sum(0)
    out64 = ysum64 * torch.nn.functional.silu(z64)
    gy64, dz64 = torch.autograd.grad(out64, [ysum64, z64], grad)

    def on(t):
        return t.to(device=device, dtype=dtype)

    xz_d = on(xz)
    z = xz_d[..., d:].transpose(1, 2)
    ysum, out = gate_forward(on(y), z, branches)
    gy, dz, out_again = gate_backward(on(grad), ysum, z, dtype)
    assert rel_err(ysum, ysum64) < tol and rel_err(out, out64) < tol
    assert rel_err(gy, gy64) < tol and rel_err(dz, dz64) < tol
    assert torch.equal(out_again, out)  # recomputed for the output projection's weight gradient: the forward's, bit for bit


GATE_CASES = [(3, 2, 12, 200), (2, 1, 17, 150), (3, 1, 96, 512)]  # channels and tokens not multiples of the blocks


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("branches,b,d,length", GATE_CASES)
def test_fused_gate_under_interpreter(branches, b, d, length, monkeypatch):
    _interpreter_index_patch(monkeypatch)
    check_gate("cpu", branches, b, d, length)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_fused_gate_in_bf16_under_interpreter(monkeypatch):
    _interpreter_index_patch(monkeypatch)
    check_gate("cpu", *GATE_CASES[0], dtype=torch.bfloat16, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("branches,b,d,length", GATE_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fused_gate_kernels(branches, b, d, length, dtype, tol):
    check_gate("cuda", branches, b, d, length, dtype=dtype, tol=tol)


def check_fused_tom(device, dim, shape, nslices=None, orientations=("forward", "reverse", "slice"), batch=2,
                    layout=torch.contiguous_format):
    from segresmamba.ssm import TriOrientedMamba

    torch.manual_seed(0)
    layer = TriOrientedMamba(dim, nslices=nslices, orientations=orientations, scan_backend="torch").to(device)
    x = torch.randn(batch, dim, *shape, device=device).contiguous(memory_format=layout).requires_grad_()
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    layer.scan_backend = "triton"  # fused by default
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    assert out.is_contiguous(memory_format=layout) and grads[0].is_contiguous(memory_format=layout)
    assert rel_err(out, ref) < 1e-5
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads, ref_grads):
        assert rel_err(got, want) < 1e-4, name


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("nslices,orientations,batch,layout", [
    # under the interpreter each case takes 15-30 s on 2 cores: the NCDHW batch of 2 (covered by the NDHWC one and the
    # NCDHW batch of 1) runs with the slow tests
    pytest.param(None, ("forward", "reverse", "slice"), 2, torch.contiguous_format, marks=pytest.mark.slow),
    (None, ("forward", "reverse", "slice"), 1, torch.contiguous_format),  # one broadcast output gradient (row stride 0)
    (2, ("slice", "forward"), 2, torch.contiguous_format),
    (None, ("forward", "reverse", "slice"), 2, torch.channels_last_3d),  # --model.channels_last: an NDHWC map
])
def test_fused_tom_under_interpreter(nslices, orientations, batch, layout, monkeypatch):
    _interpreter_index_patch(monkeypatch)
    monkeypatch.setattr(fused_tom, "SPLIT_K_PIECE", 24)  # weight gradients from token pieces and a remainder, as at 64^3
    check_fused_tom("cpu", 4, (4, 4, 4), nslices, orientations, batch, layout)


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("batch,layout", [
    pytest.param(2, torch.contiguous_format, marks=pytest.mark.slow),  # 35 s under the interpreter on 2 cores
    (1, torch.channels_last_3d)])
def test_fused_tom_branch_by_branch_under_interpreter(batch, layout, monkeypatch):
    """The backward run one branch at a time (as for large layers) gives the same gradients; chunks of 16 tokens, so
    that each branch's chunk-entering states matter."""
    _interpreter_index_patch(monkeypatch)
    monkeypatch.setattr(fused_tom, "one_branch_at_a_time", lambda branches, elements, device: True)
    monkeypatch.setitem(fused_tom.TUNING, "chunk", 16)
    monkeypatch.setattr(fused_tom, "SPLIT_K_PIECE", 24)
    check_fused_tom("cpu", 4, (4, 4, 4), None, ("forward", "reverse", "slice"), batch, layout)


@needs_triton
def test_branch_by_branch_backward_in_captures_of_large_layers_only(monkeypatch):
    cuda, big = torch.device("cuda"), fused_tom.PER_BRANCH_BACKWARD_ELEMENTS
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert fused_tom.one_branch_at_a_time(3, big, cuda)
    assert not fused_tom.one_branch_at_a_time(3, big - 1, cuda)  # a small layer: its launches matter more
    assert not fused_tom.one_branch_at_a_time(1, big, cuda)
    assert not fused_tom.one_branch_at_a_time(3, big, torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not fused_tom.one_branch_at_a_time(3, big, cuda)  # eager: each launch costs the host
    with scan_mod.timing_kernels():  # a graph's warm-up: the path its capture will take
        assert fused_tom.one_branch_at_a_time(3, big, cuda)


@pytest.mark.gpu
def test_fused_tom_matches_torch_backend(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(fused_tom, "SPLIT_K_PIECE", 96)  # weight gradients from token pieces and a remainder, as at 64^3
    check_fused_tom("cuda", 16, (8, 8, 8))
    check_fused_tom("cuda", 16, (8, 8, 8), batch=1)
    check_fused_tom("cuda", 16, (8, 8, 8), layout=torch.channels_last_3d)
    monkeypatch.setattr(fused_tom, "one_branch_at_a_time", lambda branches, elements, device: True)  # as in a capture
    check_fused_tom("cuda", 16, (8, 8, 8))


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
def test_auto_times_fused_against_per_branch_under_interpreter(monkeypatch):
    """``auto`` times the fused node against the per-branch path once per signature (a warm-up and AUTO_REPEATS timed
    calls each), keeps the faster and leaves no gradients. Under bf16 autocast the measurement runs the fused node's
    backward inside the autocast region (fp32 weights, bf16 activations): the fused backend must be timed there, not
    dropped with a warning."""
    from segresmamba.ssm import TriOrientedMamba

    _interpreter_index_patch(monkeypatch)
    monkeypatch.setattr(scan_mod, "_AUTO_CHOICES", {})
    monkeypatch.setattr(scan_mod, "AUTO_REPEATS", 1)
    monkeypatch.setattr(fused_tom, "SPLIT_K_PIECE", 16)  # the weight gradients in token pieces, as at full size
    layer = TriOrientedMamba(4, scan_backend="auto")
    x = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    calls = []
    mix = layer._mix
    monkeypatch.setattr(layer, "_mix", lambda a, n, fused: calls.append(fused) or mix(a, n, fused))
    with warnings.catch_warnings(record=True) as caught, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        first = layer._choose_fused(x, 4)
        assert layer._choose_fused(x, 4) == first  # cached for this signature
    assert not [str(w.message) for w in caught if "failed while auto measured" in str(w.message)]
    assert calls.count(True) == calls.count(False) == 2 and len(calls) == 4
    (choice,) = scan_mod.auto_choices().values()
    assert choice["backend"] == ("triton_fused" if first else "per_branch") and set(choice["ms"]) == {"triton_fused", "per_branch"}
    assert all(p.grad is None for p in layer.parameters()) and x.grad is None  # measuring leaves no gradients


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("channels,side,dtype,layout", [
    (5, 3, torch.float32, torch.contiguous_format), (48, 4, torch.float32, torch.contiguous_format),
    (20, 5, torch.bfloat16, torch.contiguous_format), (5, 3, torch.float32, torch.channels_last_3d),
    (20, 5, torch.bfloat16, torch.channels_last_3d)])
def test_token_layer_norm_under_interpreter(channels, side, dtype, layout, monkeypatch):
    """The ToM LayerNorm read from the map in place equals LayerNorm of its transposed tokens in float64 (output and
    every gradient); a 16-bit map gives the tokens and dx in its dtype, the fp32 norm rounded once. A channels-last
    map is read as it lies and gets dx in its layout."""
    from segresmamba.ssm.triton.token_norm import TokenLayerNormFn, token_layer_norm, token_layer_norm_applies

    _interpreter_index_patch(monkeypatch)
    torch.manual_seed(channels)
    norm = torch.nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, channels, side, side, side) * 3 + 1).to(dtype).contiguous(memory_format=layout).requires_grad_()
    assert token_layer_norm_applies(x, norm)
    out = token_layer_norm(x, norm)
    assert out.dtype == dtype and out.shape == (2, side**3, channels)
    params64 = [norm.weight.double(), norm.bias.double()]
    x64 = x.detach().double().requires_grad_()
    ref = F.layer_norm(x64.flatten(2).transpose(1, 2), (channels,), *params64, norm.eps)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(out.double(), ref) < tol
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, norm.weight, norm.bias], g.to(dtype))
    want = torch.autograd.grad(ref, [x64, *params64], g.to(dtype).double())
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    assert got[0].is_contiguous(memory_format=layout)
    for name, a, b in zip(("x", "weight", "bias"), got, want):
        assert rel_err(a.double(), b) < tol, name
    # under autocast the tokens come in the autocast dtype, as the input projection reads them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert token_layer_norm(x.detach().float(), norm).dtype == torch.bfloat16
    assert TokenLayerNormFn.apply(x.detach().flatten(2), norm.weight, norm.bias, norm.eps, torch.float32).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_token_layer_norm_on_gpu_matches_layer_norm_and_in_proj_under_autocast(layout):
    """On CUDA under bf16 autocast, LayerNorm read in place then the input projection equals the PyTorch ops they
    replace (the map cast to fp32, the norm, the projection casting back), output and every gradient."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from segresmamba.ssm.triton.token_norm import token_layer_norm

    torch.manual_seed(0)
    norm, proj = torch.nn.LayerNorm(48).cuda(), torch.nn.Linear(48, 192, bias=False).cuda()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(1, 48, 16, 16, 16, device="cuda").bfloat16().contiguous(memory_format=layout).requires_grad_()
    leaves = [x, norm.weight, norm.bias, proj.weight]
    results = []
    for fused in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tokens = token_layer_norm(x, norm) if fused else norm(x.flatten(2).transpose(1, 2))
            out = proj(tokens)
        results.append((out, torch.autograd.grad(out.float().square().sum(), leaves)))
    (ref, ref_grads), (got, got_grads) = results
    assert got.dtype == ref.dtype == torch.bfloat16
    assert rel_err(got, ref) < 1e-2
    for name, a, b in zip(("x", "weight", "bias", "in_proj"), got_grads, ref_grads):
        assert a.dtype == b.dtype and rel_err(a, b) < 2e-2, name


@needs_triton
def test_token_layer_norm_applies_to_contiguous_and_channels_last_maps_and_affine_norms_only():
    from segresmamba.ssm.triton.token_norm import token_layer_norm_applies

    x = torch.zeros(1, 6, 2, 2, 2)
    assert token_layer_norm_applies(x, torch.nn.LayerNorm(6))
    assert not token_layer_norm_applies(x.transpose(2, 3), torch.nn.LayerNorm(6))  # not contiguous
    assert token_layer_norm_applies(x.contiguous(memory_format=torch.channels_last_3d), torch.nn.LayerNorm(6))
    assert not token_layer_norm_applies(x, torch.nn.LayerNorm(6, elementwise_affine=False))
    assert not token_layer_norm_applies(x, torch.nn.LayerNorm(6, bias=False))
    assert not token_layer_norm_applies(x.double(), torch.nn.LayerNorm(6))
    assert not token_layer_norm_applies(x[:, :, 0], torch.nn.LayerNorm(6))  # not a 3D map


@needs_triton
def test_stacked_branch_parameters_match_per_kind_stacks():
    """One concatenation gives the same (R, ...) stacks as a ``torch.stack`` per kind (conv taps as (R, d, K));
    parameters of mixed dtypes are stacked per kind."""
    from segresmamba.ssm import TriOrientedMamba

    torch.manual_seed(0)
    layer = TriOrientedMamba(4, dt_rank=2)
    branches = list(layer.branches.values())
    params = fused_tom.branch_parameters(branches)
    assert len(params) == 7 * len(branches) and {id(p) for p in params} == {id(p) for p in layer.branches.parameters()}
    stacked = fused_tom.stack_branch_parameters(params, len(branches))
    per_kind = {
        "conv_weight": torch.stack([br.conv1d.weight[:, 0, :] for br in branches]),
        "conv_bias": torch.stack([br.conv1d.bias for br in branches]),
        "x_proj": torch.stack([br.x_proj.weight for br in branches]),
        "dt_weight": torch.stack([br.dt_proj.weight for br in branches]),
        "dt_bias": torch.stack([br.dt_proj.bias for br in branches]),
        "A_log": torch.stack([br.A_log for br in branches]),
        "D": torch.stack([br.D for br in branches]),
    }
    assert tuple(stacked) == fused_tom.PARAMETER_KINDS == tuple(per_kind)
    for name, want in per_kind.items():
        assert torch.equal(stacked[name], want), name
    branches[0].D.data = branches[0].D.data.double()
    mixed = fused_tom.stack_branch_parameters(fused_tom.branch_parameters(branches), len(branches))
    assert mixed["D"].dtype == torch.float64 and mixed["A_log"].dtype == torch.float32  # per-kind stacks, promoted


@needs_triton
def test_weight_grad_casts_operands_as_matmul_does():
    """Under autocast, fp32 and bf16 operands are multiplied in bf16 as ``matmul`` would (bmm's ``out=`` form,
    which the pieces use, is outside autocast); without it, mixed dtypes are promoted."""
    torch.manual_seed(0)
    g, x = torch.randn(2, 1, 5, 64), torch.randn(2, 1, 7, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_tom._weight_grad(g, x, 16)
    want = sum(torch.matmul(g[..., j:j + 16].bfloat16(), x[..., j:j + 16].transpose(-1, -2)).float() for j in range(0, 64, 16)).sum(1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fused_tom._weight_grad(g, x, 16), torch.matmul(g, x.float().transpose(-1, -2)).sum(1), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("token_major", [False, True])  # x's token axis of stride 1 (NCDHW tokens) or of stride I (NDHWC)
@pytest.mark.parametrize("piece,length", [(8, 37), (16, 32), (64, 20)])  # split with a remainder, exact pieces, one partial piece
def test_weight_grad_in_token_pieces_matches_one_matmul(piece, length, token_major):
    """The projections' weight gradients, summed from partial products over token pieces, equal one matmul's,
    and the pieces are read in place: no operand is copied into a batch layout first."""
    torch.manual_seed(0)
    g = torch.randn(3, 2, 5, length, dtype=torch.float64)
    x = torch.randn(3, 2, length, 7, dtype=torch.float64).transpose(-1, -2) if token_major else torch.randn(3, 2, 7, length, dtype=torch.float64)
    want = torch.matmul(g, x.transpose(-1, -2)).sum(1)
    got = []
    _, _, ops = operator_counts(lambda: got.append(fused_tom._weight_grad(g, x, piece)))
    torch.testing.assert_close(got[0], want.float(), rtol=1e-6, atol=1e-6)
    if length >= piece:
        assert "bmm" in ops
    assert not {"clone", "contiguous", "copy_", "_to_copy"} & set(ops), ops


@pytest.mark.skipif(not _interpreting(), reason="needs TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("upcast", ["all", "states", "none"])
def test_half_precision_under_interpreter(upcast, monkeypatch):
    """16-bit inputs, with and without the fp32 copies for the kernels: same oracle, gradients in the inputs' dtype."""
    _interpreter_index_patch(monkeypatch)
    monkeypatch.setitem(tuning.TUNING, "upcast", upcast)
    check_kernels("cpu", 2, 3, 5, 37, 16, dtype=torch.float16, tol=1e-2)


@needs_triton
@pytest.mark.parametrize("rank,d_state,padded", [(3, 16, 8), (6, 16, 8), (12, 16, 16), (24, 16, 24), (1, 2, 5), (8, 0, 8)])
def test_dt_weight_is_padded_to_aligned_gemms_with_zero_columns(rank, d_state, padded):
    """The dt projection's weights get zero columns up to a multiple of 8 (never past B and C's rows); multiplied by as
    many leading rows of x_dbl, they give the unpadded product (to the summation order's rounding), whatever B holds."""
    torch.manual_seed(0)
    w_dt = torch.randn(3, 10, rank, dtype=torch.float64)
    x_dbl = torch.randn(3, 2, rank + 2 * d_state, 7, dtype=torch.float64) * 1e6
    w = fused_tom.aligned_dt_weight(w_dt, d_state)
    assert w.shape == (3, 10, padded) and torch.equal(w[..., :rank], w_dt) and not w[..., rank:].any()
    torch.testing.assert_close(w.unsqueeze(1) @ x_dbl[:, :, :padded], w_dt.unsqueeze(1) @ x_dbl[:, :, :rank], rtol=1e-12, atol=0)


def test_backward_is_mirrored_where_tritons_reverse_scan_flips_tiles(monkeypatch):
    """By default the dh recurrence runs mirrored under Triton 3.6-3.8 (whose reverse scan flips four tiles across the
    lanes) and as a reverse scan from 3.9 on; an explicit setting wins; anything else is refused."""
    monkeypatch.setitem(tuning.TUNING, "bwd_mirror", None)
    for version, mirrored in [("3.6.0", True), ("3.7.1", True), ("3.8.0", True), ("3.9.0", False), ("3.10.0+git1a2b", False),
                              ("4.0.0", False), ("2.3.1", True), ("3.5.0.dev20250101", True), ("nightly", False)]:
        assert tuning.mirrored_backward(version) is mirrored, version
    monkeypatch.setitem(tuning.TUNING, "bwd_mirror", False)
    assert not tuning.mirrored_backward("3.6.0")
    monkeypatch.setitem(tuning.TUNING, "bwd_mirror", True)
    assert tuning.mirrored_backward("3.9.0")
    monkeypatch.setitem(tuning.TUNING, "bwd_mirror", "yes")
    with pytest.raises(ValueError, match="bwd_mirror.*true, false or null, got 'yes'"):
        tuning.mirrored_backward("3.9.0")


@pytest.mark.parametrize("value", ['"yes"', "1", "[true]"])
def test_tuning_environment_refuses_a_non_boolean_mirror(value, monkeypatch):
    """A bad ``bwd_mirror`` in SEGRESMAMBA_TRITON_SCAN is named when the settings are read, not inside a backward."""
    monkeypatch.setattr(tuning, "TUNING", dict(tuning.TUNING))
    monkeypatch.setenv(tuning.TUNING_ENV, '{"bwd_mirror": %s}' % value)
    with pytest.raises(ValueError, match="SEGRESMAMBA_TRITON_SCAN: bwd_mirror must be true, false or null"):
        tuning._read_environment()
    monkeypatch.setenv(tuning.TUNING_ENV, '{"bwd_mirror": false}')
    tuning._read_environment()
    assert tuning.TUNING["bwd_mirror"] is False


def test_unknown_upcast_mode_is_refused(monkeypatch):
    monkeypatch.setitem(tuning.TUNING, "upcast", "half")
    with pytest.raises(ValueError, match="upcast"):
        tuning.kernel_inputs(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))


def test_tom_traces_the_per_branch_path(monkeypatch):
    """fvcore's MAC count traces the layer; the Triton kernels are opaque to the tracer, so a trace records
    the per-branch path (same parameters, same arithmetic) even where the fused path would run."""
    from segresmamba.ssm import TriOrientedMamba, tom

    monkeypatch.setattr(tom, "fused_available", lambda device: True)
    layer = TriOrientedMamba(4, scan_backend="triton")
    x = torch.zeros(1, 4, 2, 2, 2)
    assert layer._use_fused(x, 2)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert not layer._use_fused(x, 2)


@needs_triton
@pytest.mark.parametrize("shape,dim", [((3, 4096, 6, 4), 1), ((2, 3, 97, 5), 2), ((3, 1, 4), 1), ((3, 36, 2), 1)])
@pytest.mark.parametrize("split_from", [1, None])  # every K split (a prime K or 1: one reduction), or the default
def test_sum_partials_is_the_sum(shape, dim, split_from, monkeypatch):
    """Two reductions over sqrt(K)-sized pieces give the plain sum."""
    from segresmamba.ssm.triton import autograd
    from segresmamba.ssm.triton.autograd import sum_partials

    if split_from is not None:
        monkeypatch.setattr(autograd, "SPLIT_SUM_ROWS", split_from)
    parts = torch.randn(shape, dtype=torch.float64)
    got = sum_partials(parts, dim)
    assert got.shape == parts.sum(dim).shape
    torch.testing.assert_close(got, parts.sum(dim), rtol=1e-12, atol=1e-12)


@needs_triton
def test_codes_made_inside_a_capture_are_filled_by_the_graph_and_not_cached(monkeypatch):
    """A branch's code first asked for inside a capture (the branch-by-branch backward) is filled on the device by
    the graph's own kernels, not copied from the host (which a capture refuses), and is not kept for eager calls."""
    cpu = torch.device("cpu")
    codes = (2, 0)
    monkeypatch.setattr(triton_scan, "_code_tensors", {})
    monkeypatch.setattr(triton_scan, "capturing", lambda device: True)
    filled = triton_scan.codes_on(cpu, codes)
    assert filled.dtype == torch.int32 and filled.tolist() == [2, 0] and not triton_scan._code_tensors
    monkeypatch.setattr(triton_scan, "capturing", lambda device: False)
    assert triton_scan.codes_on(cpu, codes).tolist() == [2, 0] and (cpu, codes) in triton_scan._code_tensors
