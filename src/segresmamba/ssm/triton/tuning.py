"""Launch settings of the Triton selective scan, read at call time by :mod:`segresmamba.ssm.triton.autograd`.

This module is imported on the first use of the Triton backend, not at ``import segresmamba``: the
``SEGRESMAMBA_TRITON_SCAN`` environment variable (JSON, e.g. ``'{"chunk": 128, "warps": 4}'``) is read then.
It needs no Triton, so ``perf/scan_bench.py --tune`` and the tests can read and change :data:`TUNING`.

:data:`TUNING` (None: the heuristic of :func:`segresmamba.ssm.triton.autograd.launch_plan`) was tuned by
``perf/scan_bench.py --tune`` on an H200 (d 96, 64^3 tokens, fwd+bwd, results/perf/scan.md). One warp per
program over 64-token chunks: the (state x token) tiles of a channel then sit in one warp, so the scans and
the sums over states are register shuffles with no shared-memory barrier; with 4 warps over 128 tokens the
states spread over the warps and every such sum crossed them (fp32 6.1 ms -> 4.9 ms; 32-token chunks are as
fast and need more chunk-state memory).

``upcast``: which bf16/fp16 inputs go to the kernels as fp32 copies: "all" (u, delta, B, C and dy), "states"
(B and C, the (state x token) tiles) or "none". With 4-warp programs over 128 tokens the copies paid (bf16
8.2 ms with "none", 6.5 ms with "all": 16-bit tiles are laid out 8 tokens per thread and the backward needed
more registers); with one warp over 64 tokens "none" is as fast (5.09 vs 5.15 ms) and needs no copies
(0.54 vs 0.85 GiB). Outputs and gradients keep the inputs' dtypes, and copies live only while the kernels run.
"""

from __future__ import annotations

import json
import os

import torch

MAX_CHANNEL_GROUP = 16  # channels one program walks through, reusing its B and C tiles
CARRY_ROWS = 64  # chunks per step of the cross-chunk carry
CARRY_LANES = 32  # (channel, state) lanes per carry program
UPCAST_MODES = ("all", "states", "none")
TUNING_ENV = "SEGRESMAMBA_TRITON_SCAN"

TUNING = {"chunk": 64, "warps": 1, "bwd_warps": None, "bwd_maxnreg": None, "max_group": MAX_CHANNEL_GROUP, "upcast": "none"}


def _read_environment() -> None:
    text = os.environ.get(TUNING_ENV)
    if not text:
        return
    try:
        override = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{TUNING_ENV} must be a JSON object such as '{{\"chunk\": 128}}', got {text!r}: {err}") from err
    if not isinstance(override, dict) or set(override) - set(TUNING):
        raise ValueError(f"{TUNING_ENV} must be a JSON object with keys from {sorted(TUNING)}, got {text!r}")
    TUNING.update(override)


_read_environment()


def autocast_dtype_or(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast runs matmuls in on ``device_type`` where it is on there, else ``default``: what the fused
    paths, which switch autocast off inside, compute in to match the ops they replace."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a launch grid. Plain integer arithmetic: Triton 3.9's ``triton.cdiv`` is a constexpr function
    whose call costs the host about 2 µs, and a ToM layer's step makes a dozen such calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as ``triton.next_power_of_2`` without its call overhead."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def kernel_inputs(u, delta, B, C, grad_y=None) -> tuple:
    """The tensors the kernels read: fp32 copies of the 16-bit ones that ``TUNING["upcast"]`` names."""
    mode = TUNING["upcast"]
    if mode not in UPCAST_MODES:
        raise ValueError(f"TUNING['upcast'] must be one of {UPCAST_MODES}, got {mode!r}")

    def up(t, on):
        return t.float() if on and t is not None and t.dtype in (torch.bfloat16, torch.float16) else t

    every = mode == "all"
    return up(u, every), up(delta, every), up(B, mode != "none"), up(C, mode != "none"), up(grad_y, every)


__all__ = ["CARRY_LANES", "CARRY_ROWS", "MAX_CHANNEL_GROUP", "TUNING", "TUNING_ENV", "UPCAST_MODES", "cdiv", "kernel_inputs",
           "next_power_of_2"]
