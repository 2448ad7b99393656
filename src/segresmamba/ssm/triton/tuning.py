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

``bwd_mirror``: how the scan backward runs its right-to-left dh recurrence. False: a reverse
``tl.associative_scan``; True: a forward scan of the chunk read backwards, whose operands are built from two flipped
token rows and a C flipped once per program, and whose result is flipped back; None (the default): mirrored where the
Triton version's reverse scan is the costlier (:func:`mirrored_backward`).
"""

from __future__ import annotations

import functools
import json
import os
import re

import torch

MAX_CHANNEL_GROUP = 16  # channels one program walks through, reusing its B and C tiles
CARRY_ROWS = 64  # chunks per step of the cross-chunk carry
CARRY_LANES = 32  # (channel, state) lanes per carry program
UPCAST_MODES = ("all", "states", "none")
TUNING_ENV = "SEGRESMAMBA_TRITON_SCAN"

TUNING = {"chunk": 64, "warps": 1, "bwd_warps": None, "bwd_maxnreg": None, "max_group": MAX_CHANNEL_GROUP, "upcast": "none",
          "bwd_mirror": None}


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
    _checked_mirror(override.get("bwd_mirror"), TUNING_ENV)
    TUNING.update(override)


def _checked_mirror(choice, source: str):
    """``choice`` where it is a valid ``bwd_mirror`` (true, false or null), else a ValueError naming ``source``."""
    if choice is not None and not isinstance(choice, bool):
        raise ValueError(f"{source}: bwd_mirror must be true, false or null, got {choice!r}")
    return choice


_read_environment()


# Triton versions before this one lower a reverse tl.associative_scan by flipping its two operand tiles and its two
# result tiles across a warp's lanes: 480 shuffles more than a forward scan of a 16 x 64 tile pair in one warp under
# 3.6.0, 3.7.1 and 3.8.0, 96 more under 3.9.0 (sm_90 SASS, results/perf/scan_notes.md, run 23)
FLIPPING_REVERSE_SCAN_BEFORE = (3, 9)


def mirrored_backward(triton_version: str) -> bool:
    """Whether the scan backward runs its dh recurrence mirrored (``TUNING["bwd_mirror"]``; None: where Triton
    ``triton_version`` is older than :data:`FLIPPING_REVERSE_SCAN_BEFORE`). Compiled for sm_90 by Triton 3.6 the
    mirrored loop of the fused layer's backward has 1,697 instructions against 2,262 (218 shuffles against 582) at
    the same registers and spills; by Triton 3.9, 1,411 against 1,379."""
    return mirrored_under(TUNING, triton_version)


def mirrored_under(settings: dict, triton_version: str) -> bool:
    """:func:`mirrored_backward` for the launch settings ``settings`` (a dict like :data:`TUNING`)."""
    choice = _checked_mirror(settings.get("bwd_mirror"), "TUNING")
    return triton_release(triton_version) < FLIPPING_REVERSE_SCAN_BEFORE if choice is None else choice


@functools.lru_cache(maxsize=8)
def triton_release(version: str) -> tuple[int, int]:
    """(major, minor) of a Triton version string; one that does not start with major.minor (a local build's own
    name) counts as newer than any release. Cached: the scan's backward asks on every call."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (1 << 30, 0)


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


__all__ = ["CARRY_LANES", "CARRY_ROWS", "FLIPPING_REVERSE_SCAN_BEFORE", "MAX_CHANNEL_GROUP", "TUNING", "TUNING_ENV", "UPCAST_MODES",
           "cdiv", "kernel_inputs", "mirrored_backward", "mirrored_under", "next_power_of_2", "triton_release"]
