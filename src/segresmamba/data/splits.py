"""Train/validation/test splits as files: the same seed gives the same split on any machine.

A split is computed from the sorted case ids and ``numpy.random.default_rng(seed).permutation``, so it
depends on nothing but the set of case ids and the seed. It is written to a small json file (commit it
beside the results) and read back on later runs; a split file whose case set does not match the data is
an error, never silently recomputed.

Two schemes:

- ``kfold``: the permuted ids are cut into ``num_folds`` near-equal folds (``numpy.array_split``); fold
  ``k`` is the validation set and the other folds train.
- ``holdout``: the first ``num_val`` permuted ids validate, the rest train (e.g. BTCV 24/6, Spleen 32/9).

Test split: the validation split, unless the dataset provides a labelled test list (then that list).
The public BraTS 2021 ``brats21_folds.json`` (MONAI SwinUNETR recipe) is read by :func:`read_brats_folds`.

Split file format (``segresmamba-split-v1``)::

    {"format": "segresmamba-split-v1", "dataset": "brats2021", "scheme": "kfold", "seed": 0,
     "num_folds": 5, "folds": [["BraTS2021_00003", ...], ...]}
    {"format": "segresmamba-split-v1", "dataset": "btcv", "scheme": "holdout", "seed": 0,
     "train": [...], "val": [...]}
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from segresmamba.errors import InputError

Scheme = Literal["kfold", "holdout"]
SPLIT_FORMAT = "segresmamba-split-v1"

__all__ = [
    "Split",
    "kfold_split",
    "holdout_split",
    "folds_from_assignment",
    "split_for_fold",
    "load_or_create_split",
    "read_brats_folds",
    "default_split_path",
    "save_split",
]


@dataclass(frozen=True)
class Split:
    """Case ids of one fold. ``test`` is the validation list unless a labelled test list exists.

    ``unsaved``: the split file record of a computed split not yet written to ``source``
    (:func:`load_or_create_split` with ``write=False``; :func:`save_split` writes it).
    """

    train: list[str]
    val: list[str]
    test: list[str] = field(default_factory=list)
    source: str = ""
    unsaved: dict | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        overlap = set(self.train) & set(self.val)
        if overlap:
            raise InputError(f"split {self.source or ''}: cases in both train and val: {sorted(overlap)}")

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test or self.val)}


def _permuted(case_ids: Sequence[str], seed: int) -> list[str]:
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise InputError("case ids must be unique")
    order = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in order]


def kfold_split(case_ids: Sequence[str], num_folds: int = 5, seed: int = 0) -> list[list[str]]:
    """``num_folds`` disjoint folds covering every case (each fold's ids sorted)."""
    if num_folds < 2:
        raise InputError(f"num_folds must be >= 2, got {num_folds}")
    if len(case_ids) < num_folds:
        raise InputError(f"cannot cut {len(case_ids)} cases into {num_folds} folds")
    chunks = np.array_split(np.asarray(_permuted(case_ids, seed), dtype=object), num_folds)
    return [sorted(str(c) for c in chunk) for chunk in chunks]


def holdout_split(case_ids: Sequence[str], num_val: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, val) with ``num_val`` validation cases drawn by the seeded permutation."""
    if not 1 <= num_val < len(case_ids):
        raise InputError(f"num_val must be within [1, {len(case_ids) - 1}] for {len(case_ids)} cases, got {num_val}")
    perm = _permuted(case_ids, seed)
    return sorted(perm[num_val:]), sorted(perm[:num_val])


def folds_from_assignment(assignment: dict[str, int]) -> list[list[str]]:
    """``{case_id: fold}`` -> list of folds (fold numbers must be 0..K-1)."""
    if not assignment:
        raise InputError("empty fold assignment")
    k = max(assignment.values()) + 1
    folds: list[list[str]] = [[] for _ in range(k)]
    for case, fold in assignment.items():
        if fold < 0:
            raise InputError(f"negative fold {fold} for case {case}")
        folds[fold].append(case)
    return [sorted(f) for f in folds]


def split_for_fold(folds: Sequence[Sequence[str]], fold: int, source: str = "") -> Split:
    """Validation = fold ``fold``; training = every other fold."""
    if not 0 <= fold < len(folds):
        raise InputError(f"fold must be within [0, {len(folds) - 1}], got {fold}")
    train = sorted(c for k, f in enumerate(folds) if k != fold for c in f)
    return Split(train=train, val=sorted(folds[fold]), source=source)


def default_split_path(root: str | Path, dataset: str, scheme: Scheme, seed: int, num_folds: int = 5, num_val: int = 0) -> Path:
    """``<root>/splits/<dataset>_<scheme>..._seed<seed>.json``."""
    tag = f"kfold{num_folds}" if scheme == "kfold" else f"holdout{num_val}"
    return Path(root) / "splits" / f"{dataset}_{tag}_seed{seed}.json"


def read_json_object(path: Path, what: str = "split file") -> dict:
    """A json file whose top level is an object; a missing, unreadable or wrong file is an InputError
    naming ``what`` and the path."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path}: expected a json object at the top level")
    return data


def _check_same_cases(path: Path, listed: set[str], case_ids: set[str]) -> None:
    missing, extra = sorted(case_ids - listed), sorted(listed - case_ids)
    if missing or extra:
        parts = []
        if extra:
            parts.append(f"{len(extra)} listed case(s) not in the data ({', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''})")
        if missing:
            parts.append(f"{len(missing)} case(s) of the data not listed ({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''})")
        raise InputError(
            f"split file {path} does not match the dataset: {'; '.join(parts)}. "
            "Delete it to regenerate it, or point split_file elsewhere."
        )


def load_or_create_split(
    case_ids: Sequence[str],
    *,
    dataset: str,
    scheme: Scheme,
    fold: int = 0,
    num_folds: int = 5,
    num_val: int = 6,
    seed: int = 0,
    path: str | Path | None = None,
    write: bool = True,
) -> Split:
    """Read the split file at ``path`` if it exists (checking its case set and settings), else compute the
    split and write it there (an unwritable location only warns: the split is reproducible anyway).

    ``write=False`` leaves the writing to :func:`save_split` (the data modules write a split only once its
    cases have passed validation, so that a failed validation leaves no split file behind that lists a
    case the user then removes)."""
    ids = set(case_ids)
    if scheme not in ("kfold", "holdout"):
        raise InputError(f"unknown split scheme {scheme!r}; use 'kfold' or 'holdout'")
    if scheme == "holdout" and fold != 0:
        raise InputError(f"fold={fold} needs split 'kfold'; a holdout split has only fold 0")
    path = Path(path) if path is not None else None
    if path is not None and path.is_file():
        data = read_json_object(path)
        if data.get("format") != SPLIT_FORMAT:
            raise InputError(f"split file {path}: not a {SPLIT_FORMAT} file (missing or wrong 'format')")
        if data.get("scheme") != scheme:
            raise InputError(f"split file {path} holds a {data.get('scheme')!r} split but split={scheme!r} was asked for")
        if scheme == "kfold":
            folds = data.get("folds")
            if not isinstance(folds, list) or not all(isinstance(f, list) for f in folds):
                raise InputError(f"split file {path}: 'folds' must be a list of lists of case ids")
            if len(folds) != num_folds:
                raise InputError(f"split file {path} has {len(folds)} folds but num_folds={num_folds}")
            _check_same_cases(path, {c for f in folds for c in f}, ids)
            return split_for_fold(folds, fold, source=str(path))
        train, val = data.get("train"), data.get("val")
        if not isinstance(train, list) or not isinstance(val, list):
            raise InputError(f"split file {path}: a holdout split needs 'train' and 'val' lists")
        _check_same_cases(path, set(train) | set(val), ids)
        return Split(train=sorted(train), val=sorted(val), source=str(path))

    record: dict = {"format": SPLIT_FORMAT, "dataset": dataset, "scheme": scheme, "seed": seed}
    if scheme == "kfold":
        folds = kfold_split(sorted(ids), num_folds, seed)
        record.update(num_folds=num_folds, folds=folds)
        split = split_for_fold(folds, fold, source=str(path or "computed"))
    else:
        train, val = holdout_split(sorted(ids), num_val, seed)
        record.update(train=train, val=val)
        split = Split(train=train, val=val, source=str(path or "computed"))
    if path is None:
        return split
    split = dataclasses.replace(split, unsaved=record)
    return save_split(split) if write else split


def save_split(split: Split) -> Split:
    """Write a computed split's file (:attr:`Split.unsaved`) to ``split.source``; the split without it.
    A split read from a file, or one without a path, is returned as it is."""
    if split.unsaved is None:
        return split
    write_json_or_warn(Path(split.source), split.unsaved, "split")
    return dataclasses.replace(split, unsaved=None)


def write_json_or_warn(path: Path, record: dict, what: str) -> None:
    """Write ``record`` to ``path`` atomically (parallel ranks may race); an unwritable place only warns
    that the computed ``what`` is used (it can be computed again)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write {what} file {path} ({err}); using the computed {what}", stacklevel=3)


def read_brats_folds(path: str | Path) -> dict[str, int]:
    """Read a ``brats21_folds.json`` (MONAI SwinUNETR BraTS21 recipe) into ``{case_id: fold}``.

    Format: ``{"training": [{"fold": k, "image": [4 paths], "label": "…/BraTS2021_XXXXX_seg.nii.gz"}, …]}``.
    The case id is the label file's folder name; the image order in the json is not used (the adapter
    always stacks channels in :data:`~segresmamba.data.phantoms.BRATS_CHANNELS` order).
    """
    path = Path(path)
    data = read_json_object(path)
    entries = data.get("training")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"folds file {path}: expected a non-empty 'training' list")
    assignment: dict[str, int] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "fold" not in entry or "label" not in entry:
            raise InputError(f"folds file {path}: entry {n} needs 'fold' and 'label' keys")
        try:
            fold = int(entry["fold"])
        except (TypeError, ValueError):
            raise InputError(f"folds file {path}: entry {n} has a non-integer fold {entry['fold']!r}") from None
        case = Path(str(entry["label"]).replace("\\", "/")).parent.name
        if not case:
            raise InputError(f"folds file {path}: cannot read a case folder from label {entry['label']!r}")
        if case in assignment and assignment[case] != fold:
            raise InputError(f"folds file {path}: case {case} appears in folds {assignment[case]} and {fold}")
        assignment[case] = fold
    return assignment
