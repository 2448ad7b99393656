"""Keep MONAI's import-time ``CUBLAS_WORKSPACE_CONFIG`` out of runs that did not ask for it.

Importing MONAI sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the process's environment when it is unset
(``monai/utils/misc.py``, so that ``torch.use_deterministic_algorithms(True)`` can later run cuBLAS). Torch
versions that do not cache the variable's parse read it and parse it with ``std::regex`` each time a cuBLAS
handle is set up, once per GEMM (``getChosenWorkspaceSize`` in ``aten/src/ATen/cuda/CublasHandlePool.cpp``). On
an NVIDIA H200 host with torch 2.11, a bf16 ``F.linear`` of 512 x 96 by 96 x 48 cost the host 13.7 µs per call in
a bare process and 53-56 µs in processes that had imported MONAI (``perf.host_time.host_costs``;
results/perf/scan_notes.md, run 15). An eager training step bound by its host, such as SegResMamba's with about a
hundred GEMMs, pays that on every one.

Whether a run asked for the variable is decided when this package is imported: set before MONAI was imported
means a user (or a launcher) set it, and it stays; MONAI's value handed down by a parent process that had this
package imported (marked with :data:`INHERITED_MARK`) counts as MONAI's. Otherwise :func:`drop_monai_cublas_config` removes it, unless
deterministic algorithms are on (they need it; Lightning's ``Trainer(deterministic=True)`` sets it again
itself). :class:`segresmamba.task.SegmentationTask` calls it when built, which covers ``segresmamba fit`` /
``test`` / ``predict`` and the profilers.
"""

from __future__ import annotations

import os
import sys

import torch

MONAI_DEFAULT = ":4096:8"
# Set in the environment where this package found the variable free for MONAI: child processes (the efficiency
# profiler's workers, DDP ranks, bench subprocesses) inherit MONAI's value from their parent and this mark with it.
INHERITED_MARK = "SEGRESMAMBA_CUBLAS_CONFIG_FROM_MONAI"
# True where nobody had set the variable before this point and MONAI, not yet imported, may set it later; or where
# a parent process of this package's found it so and passed MONAI's value down
_MONAI_MAY_SET = ("monai" not in sys.modules and "CUBLAS_WORKSPACE_CONFIG" not in os.environ) or (
    os.environ.get(INHERITED_MARK) == "1" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (None, MONAI_DEFAULT)
)
if _MONAI_MAY_SET:
    os.environ[INHERITED_MARK] = "1"


def drop_monai_cublas_config() -> bool:
    """Remove ``CUBLAS_WORKSPACE_CONFIG`` where importing MONAI set it and nothing needs it. True if removed."""
    if not _MONAI_MAY_SET or torch.are_deterministic_algorithms_enabled():
        return False
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") != MONAI_DEFAULT:
        return False
    del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    return True


__all__ = ["drop_monai_cublas_config"]
