"""What one call of a few kinds of GPU operation costs the host.

A training step bound by its host (kernel launches and Python, not GPU work) is as fast as its host, and lent
machines of one GPU model differ there: these figures, recorded beside a row, make eager step times of different
machines and processes comparable. :func:`host_costs` times, back to back with the GPU idle at the start: an
elementwise op, a cuBLAS GEMM, a cuDNN 3D convolution and a Triton kernel launch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["HOST_COST_KINDS", "host_costs", "host_costs_text", "sync_device"]

HOST_COST_KINDS = {"elementwise": "elementwise op", "gemm": "GEMM", "conv3d": "cuDNN conv3d", "triton_launch": "Triton launch"}


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_us(fn: Callable, device: torch.device, calls: int, warmup: int = 10) -> float:
    """Median over 5 rounds of the host's time per call of ``fn``, ``calls`` calls back to back per round (the
    GPU idle at the start of each round, so small kernels never fill the launch queue)."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(5):
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    sync_device(device)
    return statistics.median(rounds)


def host_costs(device: torch.device, calls: int = 50) -> dict[str, float | None]:
    """Host microseconds per call of: ``elementwise`` (an add of two 1,024-element tensors), ``gemm``
    (``F.linear`` of a 512 x 96 input by a 48 x 96 weight, bf16 on CUDA, fp32 on a CPU), ``conv3d`` (cuDNN, bf16,
    1 x 8 x 16^3 by an 8 x 8 x 3^3 kernel; CUDA only) and ``triton_launch`` (the selective scan's carry kernel on
    a tiny input, its output allocation included; CUDA with Triton only). None where not measured. On a CPU the
    figures include the computation itself."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(1024, device=device), torch.randn(1024, device=device)
    x, w = torch.randn(512, 96, device=device, dtype=dtype), torch.randn(48, 96, device=device, dtype=dtype)
    costs: dict[str, float | None] = {
        "elementwise": _per_call_us(lambda: torch.add(a, b), device, calls),
        "gemm": _per_call_us(lambda: torch.nn.functional.linear(x, w), device, calls),
        "conv3d": None,
        "triton_launch": None,
    }
    if cuda:
        v, k = torch.randn(1, 8, 16, 16, 16, device=device, dtype=dtype), torch.randn(8, 8, 3, 3, 3, device=device, dtype=dtype)
        costs["conv3d"] = _per_call_us(lambda: torch.nn.functional.conv3d(v, k, padding=1), device, calls)
        from segresmamba.ssm.triton import triton_available

        if triton_available():
            from segresmamba.ssm.triton.autograd import _run_carry

            decay, local = torch.rand(1, 4, 8, 16, device=device), torch.randn(1, 4, 8, 16, device=device)
            costs["triton_launch"] = _per_call_us(lambda: _run_carry(decay, local, reverse=False), device, calls)
    return costs


def host_costs_text(costs: dict[str, float | None]) -> str:
    """One line: the host's cost per call of each kind of :func:`host_costs`."""
    return ", ".join(f"{HOST_COST_KINDS[k]} {v:.1f} µs" for k, v in costs.items() if v is not None) + " per call"
