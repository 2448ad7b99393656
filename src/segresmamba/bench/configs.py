"""Reading the CLI's own config files (``segresmamba fit -c a.yaml -c b.yaml``) outside the CLI.

Sweeps and the profiler stack the same files the CLI stacks, in the same order (later files win, blocks
merge key by key), to learn a run's data settings before any run starts and to validate the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["merge", "stack_configs", "instantiate_datamodule"]


def merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base``, nested dicts key by key (as jsonargparse stacks configs)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def stack_configs(paths: Sequence[Path]) -> dict[str, Any]:
    """The settings of ``-c`` files stacked in order; ValueError naming a file that is missing or not a mapping."""
    stacked: dict[str, Any] = {}
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"config file {path} not found")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path}: expected a mapping of settings, got {type(raw).__name__}")
        stacked = merge(stacked, raw)
    return stacked


def instantiate_datamodule(data_block: dict[str, Any]):
    """The data module a ``data:`` block (``class_path`` + ``init_args``) describes, built as the CLI builds it."""
    import segresmamba.data  # noqa: F401  (registers the data module classes for instantiation)
    from jsonargparse import ArgumentParser

    from segresmamba.data.base import VolumeDataModule

    if "class_path" not in data_block:
        raise ValueError(f"the data settings name no class_path: {data_block}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VolumeDataModule, "data")
    try:
        cfg = parser.parse_object({"data": {"class_path": data_block["class_path"], "init_args": dict(data_block.get("init_args") or {})}})
    except Exception as err:  # jsonargparse's ArgumentError: say which settings it refused
        raise ValueError(f"data settings refused: {err}") from None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    return instantiate(cfg).data
