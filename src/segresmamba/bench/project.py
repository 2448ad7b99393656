"""Where the benchmark tools find the project's configs and the paper's figures, and put results.

The installed package holds no path into a checkout: the project folder is ``$SEGRESMAMBA_ROOT`` when set,
else the nearest folder at or above the working directory that holds ``configs/model/`` (the layout of this
repository), else the working directory itself. Relative paths in sweep files and command lines are read
against that folder.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["project_root", "resolve", "model_config"]


def project_root() -> Path:
    """The project folder (see the module docstring)."""
    env = os.environ.get("SEGRESMAMBA_ROOT")
    if env:
        root = Path(env).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"SEGRESMAMBA_ROOT={env} is not a directory")
        return root
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "configs" / "model").is_dir():
            return folder
    return cwd


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """``path`` as is when absolute, else under the project folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (root or project_root()) / path


def model_config(model: str, root: Path | None = None) -> Path | None:
    """``configs/model/<model>.yaml`` of the project, or None when the model has no config of its own."""
    path = resolve(Path("configs") / "model" / f"{model}.yaml", root)
    return path if path.is_file() else None
