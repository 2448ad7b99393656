"""MONAI's import-time CUBLAS_WORKSPACE_CONFIG is dropped where nobody asked for it, and kept where someone did."""

import os
import subprocess
import sys

import pytest

from segresmamba.cublas_env import INHERITED_MARK

# a clean environment: neither the variable nor the mark that a process of this package (this test run) hands down
FRESH = {k: v for k, v in os.environ.items() if k not in ("CUBLAS_WORKSPACE_CONFIG", INHERITED_MARK)}

SNIPPET = """
import os, torch
import segresmamba
from segresmamba.bench.step import build_task
from segresmamba.data.spec import get_dataset_spec
import monai  # noqa: F401  (sets the variable where it is unset)
before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
{extra}
build_task("unet", get_dataset_spec("spleen"), patch=32)
print(before, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
"""


def _run(env_value: str | None, extra: str = "", monai_first: bool = False) -> list[str]:
    env = dict(FRESH)
    if env_value is not None:
        env["CUBLAS_WORKSPACE_CONFIG"] = env_value
    code = ("import monai\n" if monai_first else "") + SNIPPET.format(extra=extra)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()[-2:]


@pytest.mark.parametrize(
    "env_value, extra, monai_first, want",
    [
        (None, "", False, [":4096:8", "None"]),  # MONAI set it, nobody asked: dropped when the task is built
        (":4096:8", "", False, [":4096:8", ":4096:8"]),  # the user set MONAI's value: kept
        # each case is a fresh interpreter (about 8 s on 2 cores): these two run with the slow tests
        pytest.param(None, "torch.use_deterministic_algorithms(True)", False, [":4096:8", ":4096:8"],  # determinism needs it
                     marks=pytest.mark.slow),
        pytest.param(None, "", True, [":4096:8", ":4096:8"],  # MONAI imported before this package: who set it is unknown
                     marks=pytest.mark.slow),
    ],
)
def test_monai_cublas_config_dropped_only_where_unasked(env_value, extra, monai_first, want):
    assert _run(env_value, extra, monai_first) == want


def test_monai_cublas_config_handed_to_a_child_process_is_dropped_there():
    """A worker spawned by a process that imported this package and MONAI (the efficiency profiler's GPU workers,
    DDP ranks) inherits MONAI's value; it is still MONAI's, not the user's, and goes when the child's task is built."""
    parent = (
        "import os, subprocess, sys\n"
        "import segresmamba, monai\n"
        "assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'\n"
        f"subprocess.run([sys.executable, '-c', {SNIPPET.format(extra='')!r}], check=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", parent], env=FRESH, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == [":4096:8", "None"]
