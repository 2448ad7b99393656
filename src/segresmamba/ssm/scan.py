"""Selective-scan dispatch: one call, several implementations.

``scan_backend`` is a setting everywhere a Mamba layer is built:

- ``"torch"``: :func:`segresmamba.ssm.scan_torch.selective_scan_torch`, runs anywhere.
- ``"mamba_ssm"``: the CUDA kernel of the ``mamba-ssm`` package (Gu & Dao 2023), GPU only.
- ``"triton"``: the suite's chunk-parallel Triton kernels (:mod:`segresmamba.ssm.triton`), GPU only.
- ``"auto"``: the fastest available backend for the tensors at hand. On CUDA, the first call with a new
  signature (shape, dtypes, options, grad mode) times every available GPU backend on those very inputs
  (forward, plus backward when gradients are on; one warm-up and three timed calls each) and keeps the
  fastest for that signature: which one wins depends on size and precision (results/perf/scan.md).
  Eagerly it times the wall clock, launches included; inside :func:`timing_kernels` (the warm-up before a
  CUDA-graph capture, whose replays cost no launches) it times the GPU's work alone, and keeps that choice
  apart from the eager one.
  Under CUDA-graph capture or ``torch.compile``, or with ``SEGRESMAMBA_SCAN_AUTO=order``, it takes the
  first available in ``AUTO_CUDA_ORDER`` instead (``mamba_ssm``, ``triton``, then ``torch``). On a CPU
  it is ``torch``. :func:`auto_choices` lists what was chosen and the times behind it.

Every backend is registered here by name, and the optional ones are imported lazily, on first use:
``import segresmamba`` imports neither ``mamba_ssm`` nor Triton (nor reads the Triton tuning). A missing
or broken ``mamba-ssm`` or Triton (not installed, or an extension built against another torch: "undefined
symbol") never breaks ``import segresmamba``: ``auto`` falls back to the next backend, ending at ``torch``,
with one warning that says why.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from segresmamba.ssm.scan_torch import selective_scan_torch

ScanFn = Callable[..., torch.Tensor]


@dataclass
class ScanBackend:
    """A scan implementation: ``load()`` returns the function or raises ImportError/OSError/RuntimeError."""

    name: str
    load: Callable[[], ScanFn]
    cuda_only: bool
    _fn: ScanFn | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)
    _probed: bool = field(default=False, repr=False)

    def get(self) -> ScanFn | None:
        if not self._probed:
            self._probed = True
            try:
                self._fn = self.load()
            except (ImportError, OSError, RuntimeError, AttributeError) as err:  # OSError: broken .so
                self._error = f"{type(err).__name__}: {err}"
        return self._fn

    @property
    def error(self) -> str | None:
        self.get()
        return self._error


def _load_mamba_ssm() -> ScanFn:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn


def _load_triton() -> ScanFn:
    try:
        from segresmamba.ssm.triton.autograd import selective_scan_triton
    except ImportError as err:
        if err.name == "triton":
            raise ImportError("triton is not installed") from err
        raise
    if not torch.cuda.is_available():
        raise RuntimeError("the Triton scan needs a CUDA device")
    return selective_scan_triton


_BACKENDS: dict[str, ScanBackend] = {
    "torch": ScanBackend("torch", lambda: selective_scan_torch, cuda_only=False),
    "mamba_ssm": ScanBackend("mamba_ssm", _load_mamba_ssm, cuda_only=True),
    "triton": ScanBackend("triton", _load_triton, cuda_only=True),
}
# Order in which ``auto`` tries backends on CUDA (and, among the GPU ones, measures them). mamba_ssm comes
# before triton: it measured as fast or faster in bf16 at most ToM sizes (results/perf/scan.md).
AUTO_CUDA_ORDER: list[str] = ["mamba_ssm", "triton", "torch"]
_warned: set[str] = set()
# signature -> (chosen backend, {backend: ms per call}); filled by ``auto`` on CUDA
_AUTO_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}
_AUTO_FAILURES: dict[str, None] = {}  # "backend: error" of each backend a measurement dropped, in order, once each
AUTO_REPEATS = 3
# > 0 inside ``timing_kernels``: ``auto`` measures GPU time, not wall time (see measure_fastest)
_kernel_timing_depth = 0
# an upper bound of a GPU's SM clock, to turn milliseconds into torch.cuda._sleep cycles (a longer sleep is harmless)
_SLEEP_CYCLES_PER_MS = 2_000_000
_MAX_SLEEP_MS = 500.0
log = logging.getLogger(__name__)


@contextmanager
def timing_kernels() -> Iterator[None]:
    """Within this block ``auto`` times its candidates by the GPU's work alone, the host's launch time hidden.

    For choices that CUDA graphs will replay (:mod:`segresmamba.step_graphs`, :mod:`segresmamba.ssm.cuda_graphs`):
    a replay costs no launches, so a path of many short kernels can win there and lose eagerly. Choices made
    here are kept apart from the eager ones (their signature says "kernel time")."""
    global _kernel_timing_depth
    _kernel_timing_depth += 1
    try:
        yield
    finally:
        _kernel_timing_depth -= 1


def timing_kernels_now() -> bool:
    """Whether ``auto`` measures GPU time here (inside :func:`timing_kernels`)."""
    return _kernel_timing_depth > 0


def register_scan_backend(name: str, load: Callable[[], ScanFn], cuda_only: bool, prefer_on_cuda: bool = False) -> None:
    """Add a backend; ``prefer_on_cuda`` puts it first in the ``auto`` order, a CUDA-only one otherwise goes
    just before ``torch``. ``load`` runs on first use, so registering imports nothing."""
    if name == "auto" or name in _BACKENDS:
        raise ValueError(f"scan backend name {name!r} is taken; registered: {', '.join(_BACKENDS)} (and 'auto')")
    _BACKENDS[name] = ScanBackend(name, load, cuda_only)
    if prefer_on_cuda:
        AUTO_CUDA_ORDER.insert(0, name)
    elif cuda_only:
        AUTO_CUDA_ORDER.insert(len(AUTO_CUDA_ORDER) - 1, name)


def scan_backends() -> list[str]:
    """Every backend name accepted by ``scan_backend`` (besides ``"auto"``)."""
    return list(_BACKENDS)


def backend_status() -> dict[str, str]:
    """``name -> "available" | reason`` for every backend; used by ``segresmamba doctor``."""
    return {name: "available" if b.get() is not None else (b.error or "unavailable") for name, b in _BACKENDS.items()}


def check_scan_backend(name: str) -> None:
    """Reject unknown names early (at model construction, not at the first forward)."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown scan_backend {name!r}; choose 'auto' or one of {', '.join(_BACKENDS)}")


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that ``name`` means for tensors on ``device``."""
    check_scan_backend(name)
    on_cuda = device.type == "cuda"
    if name == "auto":
        if not on_cuda:
            return "torch"
        for candidate in AUTO_CUDA_ORDER:
            backend = _BACKENDS[candidate]
            if backend.get() is not None:
                return candidate
            if candidate not in _warned and candidate != "torch":
                _warned.add(candidate)
                warnings.warn(
                    f"scan backend {candidate!r} unavailable ({backend.error}); falling back to the next one "
                    f"(ends at the pure-PyTorch scan). See `segresmamba doctor`.",
                    stacklevel=3,
                )
        return "torch"
    backend = _BACKENDS[name]
    if backend.cuda_only and not on_cuda:
        raise RuntimeError(f"scan_backend {name!r} needs CUDA tensors; use 'auto' or 'torch' on {device.type}")
    if backend.get() is None:
        raise RuntimeError(f"scan_backend {name!r} is unavailable: {backend.error}")
    return name


def auto_choices(reset: bool = False) -> dict[str, dict]:
    """What ``auto`` chose so far on CUDA: ``{signature text: {"backend": name, "ms": {name: ms}}}``;
    ``reset`` forgets the choices (the next call of each signature measures again) and :func:`auto_failures`."""
    if reset:
        _AUTO_CHOICES.clear()
        _AUTO_FAILURES.clear()
    return {_describe(key): {"backend": name, "ms": times} for key, (name, times) in _AUTO_CHOICES.items()}


def auto_failures() -> list[str]:
    """``"backend: error"`` of each backend that failed while ``auto`` measured it (and so was not used) since the
    last reset: a failure there only warns, and a result measured after one ran on a slower backend."""
    return list(_AUTO_FAILURES)


def _describe(key: tuple) -> str:
    if key[0] == "text":  # choices recorded by other layers (see record_auto_choice)
        return key[1]
    device, dtypes, shape, n, flags, grad, kernel_time = key
    return (f"cuda:{device} {'/'.join(dtypes)} (b, d, L)={shape} N={n} {flags}{' +grad' if grad else ''}"
            f"{' (kernel time)' if kernel_time else ''}")


def recorded_auto_choice(description: str) -> str | None:
    """The choice :func:`record_auto_choice` kept for ``description``, or None."""
    found = _AUTO_CHOICES.get(("text", description))
    return found[0] if found else None


def record_auto_choice(description: str, name: str, times: dict[str, float]) -> None:
    """Let another ``auto`` decision (e.g. the ToM layer's fused-or-not) show in :func:`auto_choices`."""
    _AUTO_CHOICES[("text", description)] = (name, times)
    log.info("auto: %s for %s (%s)", name, description, ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()))


def _signature(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple:
    flags = "".join(f for f, on in (("z", z is not None), ("D", D is not None), ("b", delta_bias is not None), ("s", delta_softplus)) if on)
    dtypes = tuple(str(t.dtype).removeprefix("torch.") for t in (u, delta, B))
    return (u.device.index, dtypes, tuple(u.shape), A.shape[-1], flags, torch.is_grad_enabled(), timing_kernels_now())


def _call(name: str, args: tuple) -> torch.Tensor:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = args
    fn = _BACKENDS[name].get()
    assert fn is not None
    if name == "mamba_ssm":  # the CUDA kernel wants contiguous inputs
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        z = None if z is None else z.contiguous()
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_fastest(
    fns: dict[str, Callable[[tuple], torch.Tensor]], args: tuple, repeats: int | None = None, wrt: tuple = (),
) -> tuple[str, dict[str, float]]:
    """Time each ``fns[name](args)`` on copies of ``args`` (forward, and backward when grad is on);
    returns the fastest name and the median milliseconds per call of each.

    Eagerly the time is the wall clock between two device synchronisations. Inside :func:`timing_kernels`, on
    CUDA, it is the GPU's time alone: a sleep kernel holds the GPU while the host queues the call, and CUDA
    events around the call time its kernels back to back (one more untimed wall-clock call sizes the sleep).

    The backward differentiates with respect to the copies and ``wrt`` (e.g. a layer's parameters)
    through ``torch.autograd.grad``, so no ``.grad`` of the caller's tensors is touched. It runs with autocast off,
    as a training step's backward does, even when the forward is measured inside an autocast region."""
    repeats = AUTO_REPEATS if repeats is None else repeats
    grad = torch.is_grad_enabled()
    device = args[0].device
    kernel_time = timing_kernels_now() and device.type == "cuda"
    untimed = 2 if kernel_time else 1  # compile / warm up; in kernel time also size the sleep
    times: dict[str, float] = {}
    for name, fn in fns.items():
        samples = []
        try:
            host_ms = 0.0
            for i in range(repeats + untimed):
                copies = tuple(
                    t.detach().clone().requires_grad_(grad and t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                    for t in args
                )
                _sync(device)
                if kernel_time and i >= untimed:
                    torch.cuda._sleep(int(min(2 * host_ms + 1, _MAX_SLEEP_MS) * _SLEEP_CYCLES_PER_MS))
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                t0 = time.perf_counter()
                y = fn(copies)
                if grad:
                    leaves = [t for t in copies if isinstance(t, torch.Tensor) and t.requires_grad] + [w for w in wrt if w.requires_grad]
                    # training runs its backward outside the forward's autocast region (Lightning's precision
                    # plugin wraps the forward only); the autograd engine would carry that region into the backward
                    with torch.autocast(device.type, enabled=False):
                        torch.autograd.grad(y, leaves, torch.ones_like(y), allow_unused=True)
                if kernel_time and i >= untimed:
                    end.record()
                _sync(device)
                wall_ms = (time.perf_counter() - t0) * 1000
                if i == untimed - 1:
                    host_ms = wall_ms
                elif i >= untimed:
                    samples.append(start.elapsed_time(end) if kernel_time else wall_ms)
        except Exception as err:  # noqa: BLE001 - a backend that fails here is left out, with a warning
            _AUTO_FAILURES[f"{name}: {type(err).__name__}: {err}"] = None
            warnings.warn(f"scan backend {name!r} failed while auto measured it and is not used: {type(err).__name__}: {err}", stacklevel=2)
            continue
        times[name] = sorted(samples)[len(samples) // 2]
    if not times:
        raise RuntimeError(f"every scan backend failed while auto measured them: {', '.join(fns)}")
    return min(times, key=times.get), times


def _auto_measured(args: tuple) -> str:
    """``auto`` on CUDA: the fastest available GPU backend for this signature, measured once."""
    key = _signature(*args)
    if key in _AUTO_CHOICES:
        return _AUTO_CHOICES[key][0]
    first = resolve_backend("auto", args[0].device)  # also warns once about unavailable backends
    candidates = [n for n in AUTO_CUDA_ORDER if n != "torch" and _BACKENDS[n].cuda_only and _BACKENDS[n].get() is not None]
    if len(candidates) < 2:
        _AUTO_CHOICES[key] = (first, {})
        return first
    name, times = measure_fastest({n: (lambda a, n=n: _call(n, a)) for n in candidates}, args)
    _AUTO_CHOICES[key] = (name, times)
    log.info("scan_backend auto: %s for %s (%s)", name, _describe(key), ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()))
    return name


def _measuring_allowed() -> bool:
    if os.environ.get("SEGRESMAMBA_SCAN_AUTO", "measure") == "order":
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not compiling and not capturing


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mamba-1 selective scan through the chosen backend (arguments as in :func:`selective_scan_torch`)."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if torch.jit.is_tracing():
        # a trace (fvcore's MAC count) records the scan as one op whichever backend runs it, and Triton's
        # launcher fails under the tracer (a size argument reaches the kernel as a pointer): the portable scan runs
        name = "torch"
    elif backend == "auto" and u.device.type == "cuda" and _measuring_allowed():
        name = _auto_measured(args)
    elif backend == "auto" and (measured := _AUTO_CHOICES.get(_signature(*args))):
        # inside a CUDA-graph capture: the choice measured in the warm-up, never a different default
        name = measured[0]
    else:
        name = resolve_backend(backend, u.device)
    return _call(name, args)
