"""Selective-scan dispatch: one call, several implementations.

``scan_backend`` is a setting everywhere a Mamba layer is built:

- ``"torch"``: :func:`segresmamba.ssm.scan_torch.selective_scan_torch`, runs anywhere.
- ``"mamba_ssm"``: the CUDA kernel of the ``mamba-ssm`` package (Gu & Dao 2023), GPU only.
- ``"triton"``: the suite's chunk-parallel Triton kernels (:mod:`segresmamba.ssm.scan_triton`), GPU only.
- ``"auto"``: the fastest available backend for the tensor's device, by measurement
  (results/perf/scan.md): on CUDA ``mamba_ssm`` when it imports, then ``triton``, else ``torch``.

The optional backends are probed lazily, on first use. A missing or broken ``mamba-ssm`` (not installed,
or an extension built against another torch: "undefined symbol") never breaks ``import segresmamba``:
``auto`` falls back to ``torch`` with one warning that says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
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


_BACKENDS: dict[str, ScanBackend] = {
    "torch": ScanBackend("torch", lambda: selective_scan_torch, cuda_only=False),
    "mamba_ssm": ScanBackend("mamba_ssm", _load_mamba_ssm, cuda_only=True),
}
# Order in which ``auto`` tries backends on CUDA; a faster backend registers itself at the front.
AUTO_CUDA_ORDER: list[str] = ["mamba_ssm", "torch"]
_warned: set[str] = set()


def register_scan_backend(name: str, load: Callable[[], ScanFn], cuda_only: bool, prefer_on_cuda: bool = False) -> None:
    """Add a backend; ``prefer_on_cuda`` puts it first in the ``auto`` order."""
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
    name = resolve_backend(backend, u.device)
    fn = _BACKENDS[name].get()
    assert fn is not None
    if name == "mamba_ssm":  # the CUDA kernel wants contiguous inputs
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
        z = None if z is None else z.contiguous()
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
