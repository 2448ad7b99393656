"""Where a number came from: code version, library versions, device and precision."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

_PACKAGES = ("torch", "lightning", "monai", "fvcore", "codecarbon", "mamba-ssm", "triton", "numpy")


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """Commit of the checkout, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    if os.environ.get("SEGRESMAMBA_GIT_SHA"):  # a copy of the tree without .git (e.g. shipped to a GPU box)
        return os.environ["SEGRESMAMBA_GIT_SHA"]
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["cuda"] = torch.version.cuda or "none"
    return out


def device_name(device: torch.device | str | None = None) -> str:
    """``NVIDIA H100 80GB HBM3`` on a GPU, the CPU model (or ``cpu``) otherwise."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def provenance(device: torch.device | str | None = None, precision: str | None = None) -> dict:
    """Everything that goes beside a result row."""
    return {
        "git_sha": git_sha(),
        "device": device_name(device),
        "precision": precision,
        "versions": versions(),
        "host": platform.node(),
    }
