"""Reading the CLI's own config files (``segresmamba fit -c a.yaml -c b.yaml``) outside the CLI.

Sweeps and the profiler stack the same files the CLI stacks, in the same order (later files win, blocks
merge key by key), to learn a run's data settings before any run starts and to validate the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from segresmamba.errors import InputError, plain_message

__all__ = ["merge", "read_yaml", "stack_configs", "instantiate_datamodule"]


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The content of a YAML file; InputError naming the file (and the line and column of a syntax error)
    when it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise InputError(f"{what} {path}{where}: not valid YAML ({problem})") from None


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
    """The settings of ``-c`` files stacked in order; InputError naming a file that is missing, not YAML or
    not a mapping."""
    stacked: dict[str, Any] = {}
    for path in paths:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise InputError(f"config file {path}: expected a mapping of settings, got {type(raw).__name__}")
        stacked = merge(stacked, raw)
    return stacked


def instantiate_datamodule(data_block: dict[str, Any]):
    """The data module a ``data:`` block (``class_path`` + ``init_args``) describes, built as the CLI builds it."""
    import segresmamba.data  # noqa: F401  (registers the data module classes for instantiation)
    from jsonargparse import ArgumentParser

    from segresmamba.data.base import VolumeDataModule

    if "class_path" not in data_block:
        raise InputError(f"the data settings name no class_path: {data_block}")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(VolumeDataModule, "data")
    try:
        cfg = parser.parse_object({"data": {"class_path": data_block["class_path"], "init_args": dict(data_block.get("init_args") or {})}})
    except Exception as err:  # jsonargparse's ArgumentError: say which settings it refused
        raise InputError(f"data settings refused: {plain_message(err)}") from None
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    try:
        return instantiate(cfg).data
    except ValueError as err:  # the data module's own checks, inside jsonargparse's report of the Union it tried
        raise InputError(plain_message(err)) from err
