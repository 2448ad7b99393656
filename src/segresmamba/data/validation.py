"""Check every case before training or scoring starts, so that bad input fails in seconds with a message
that names the case and the file, not hours later inside a DataLoader worker or as a silently wrong score.

From NIfTI headers (~1 ms per file, spread over threads):

- every file is present and opens as NIfTI (an unreadable or corrupt header names the file);
- the channel count: one 3D file per channel, or one 4D file with the declared number of channels;
- the label is a single 3D volume;
- image and label spatial shapes agree, and so do their affines (``allclose``, 1e-3 mm / 1e-4 relative).

From the voxels (``check_voxels=True``, the default), every image and label file read in full:

- the whole file decompresses (a ``.nii.gz`` truncated after its header is named here, not mid-epoch);
- every voxel value is finite (a NaN or Inf is named with its case and file: it would otherwise stop
  training at step 0 without a file named, or score as Dice 0);
- label values are whole numbers within the declared set (e.g. BraTS {0, 1, 2, 4}: a label 3 is caught);
- a label holds some foreground. What an empty label means depends on the case (:attr:`CaseFiles.empty_label`):
  ``error`` for training cases (the data modules' default: the model learns nothing from it and its Dice
  is undefined), ``warn`` for cases that are only scored (test sets: an organ may truly be absent), or
  ``allow``; a data module's ``empty_labels`` setting chooses for all its cases.

Reading the voxels costs the decompression: about 0.05 s per BraTS file (240x240x155 int16, ~3 MB
gzipped). The files are read by worker processes (Linux; gzip decoding in nibabel holds the GIL, so
threads barely help: on 2 free cores, 20 BraTS-sized cases (100 files) took 5.4 s in one process,
4.5-5.0 s on 2 threads and 2.8-3.1 s on 2 processes), which puts BraTS 2021's 1,251 cases at about
3 minutes on 2 cores, once: what each file held (header and voxels) is cached by path, size and
modification time (``cache_file``, a small json the data modules keep beside the split file), so later
runs read only files that changed; on an unchanged dataset a run reads no file at all (0.01 s for the
20 cases).

Outcome: one :class:`~segresmamba.errors.InputError` listing every bad case and why, or, with
``skip_bad_cases=True``, a warning naming each skipped case and why (the reasons are returned too).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from segresmamba.errors import InputError

__all__ = [
    "CaseFiles",
    "EmptyLabels",
    "FileCache",
    "check_empty_labels",
    "is_hidden",
    "read_header",
    "read_voxel_facts",
    "require_directory",
    "validate_cases",
]

AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-4
EMPTY_LABEL_POLICIES = ("error", "warn", "allow")
FILE_CACHE_FORMAT = "segresmamba-validation-cache-v1"
MAX_LISTED_VALUES = 256  # distinct label values kept per file: more means the "label" is no label map
PROCESS_POOL_BYTES = 32 * 2**20  # below this much to read, one process is faster than starting workers

EmptyLabels = Literal["error", "warn", "allow"]
Role = Literal["image", "label"]


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case.

    Args:
        case_id: name used in messages and splits.
        images: one path per channel (e.g. BraTS), or a single path to a 3D or 4D image.
        label: label volume path (``None`` for unlabelled cases).
        channels: expected number of image channels.
        label_values: allowed label values (``None``: any whole number).
        empty_label: what a label without foreground is: ``error``, ``warn`` or ``allow``.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    channels: int
    label_values: frozenset[int] | None = None
    empty_label: EmptyLabels = "error"
    extra: dict = field(default_factory=dict, compare=False)


def check_empty_labels(value: str | None, setting: str = "empty_labels") -> None:
    """InputError unless ``value`` is ``None`` or one of ``error``, ``warn``, ``allow``."""
    if value is not None and value not in EMPTY_LABEL_POLICIES:
        raise InputError(f"{setting} must be one of {', '.join(EMPTY_LABEL_POLICIES)} (or null for the default), got {value!r}")


def is_hidden(path: str | Path) -> bool:
    """macOS AppleDouble (``._*``) and other dot files, as found in the Decathlon tarballs."""
    return Path(path).name.startswith(".")


def require_directory(root: str | Path, dataset: str, hint: str) -> Path:
    """The dataset root as a Path, or an InputError saying it is missing (with ``hint`` on what goes there)."""
    path = Path(root).expanduser()
    if not path.exists():
        raise InputError(f"{dataset}: dataset directory {path} does not exist ({hint})")
    if not path.is_dir():
        raise InputError(f"{dataset}: dataset root {path} is not a directory ({hint})")
    return path


def read_header(path: str | Path) -> dict[str, Any]:
    """``{"shape": [...], "affine": [[...]]}`` of a NIfTI file from its header, or ``{"error": message}``."""
    try:
        img = nib.load(str(path))
        shape = [int(s) for s in img.shape]
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises many kinds: ImageFileError, EOFError, zlib/gzip errors
        return {"error": f"cannot read {path} as NIfTI ({type(err).__name__}: {err})"}
    if not np.all(np.isfinite(affine)):
        return {"error": f"{path} has a non-finite affine"}
    return {"shape": shape, "affine": affine.tolist()}


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:3]


def _is_single_volume(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)


def _header_problems(case: CaseFiles, headers: dict[Path, dict]) -> list[str]:
    """Problems of one case found from its files' headers (:func:`read_header`; a file without one is
    missing); an empty list if none."""
    problems: list[str] = []
    found: list[tuple[Path, tuple[int, ...], np.ndarray]] = []
    for path in (*case.images, *([case.label] if case.label is not None else [])):
        header = headers.get(path)
        if header is None:
            problems.append(f"missing file {path}")
        elif "error" in header:
            problems.append(header["error"])
        else:
            found.append((path, tuple(header["shape"]), np.asarray(header["affine"])))
    if problems:
        return problems
    images, label = (found[:-1], found[-1]) if case.label is not None else (found, None)

    if len(images) == 1:
        path, shape, _ = images[0]
        got = {3: 1, 4: shape[3] if len(shape) == 4 else None}.get(len(shape))
        if got is None:
            problems.append(f"{path} has shape {shape}: expected a 3D or 4D (X, Y, Z, C) image")
        elif got != case.channels:
            problems.append(f"wrong channel count: {path} has {got} channel(s) (shape {shape}), expected {case.channels}")
    else:
        if len(images) != case.channels:
            problems.append(f"wrong channel count: {len(images)} image files, expected {case.channels}")
        for path, shape, _ in images:
            if not _is_single_volume(shape):
                problems.append(f"wrong channel count: {path} has shape {shape}, expected one 3D channel per file")

    ref_path, ref_shape, ref_affine = images[0]
    for path, shape, affine in images[1:]:
        if _spatial(shape) != _spatial(ref_shape):
            problems.append(f"shape mismatch: {path} is {_spatial(shape)} but {ref_path} is {_spatial(ref_shape)}")
        elif not np.allclose(affine, ref_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            problems.append(f"affine mismatch between {path} and {ref_path}")

    if label is not None:
        lpath, lshape, laffine = label
        if not _is_single_volume(lshape):
            problems.append(f"label {lpath} has shape {lshape}: expected a single 3D volume")
        elif _spatial(lshape) != _spatial(ref_shape):
            problems.append(f"shape mismatch: label {lpath} is {_spatial(lshape)} but image {ref_path} is {_spatial(ref_shape)}")
        elif not np.allclose(laffine, ref_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
            problems.append(f"affine mismatch between label {lpath} and image {ref_path}")
    return problems


def _distinct_values(arr: np.ndarray) -> np.ndarray:
    """Distinct finite values of a label volume (fast path for whole numbers in [0, 65536))."""
    if arr.dtype.kind == "f":
        arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return np.zeros(0)
    lo, hi = arr.min(), arr.max()
    if lo >= 0 and hi < 65536:
        whole = arr if arr.dtype.kind in "iub" else np.rint(arr)
        if whole is arr or np.array_equal(whole, arr):
            return np.flatnonzero(np.bincount(whole.ravel().astype(np.int64, copy=False), minlength=1))
    return np.unique(arr)


def read_voxel_facts(path: str | Path, role: Role) -> dict[str, Any]:
    """What the voxel checks need to know of one file, read (decompressed) in full.

    Returns ``{"error": message}`` when the voxels cannot be read (e.g. a truncated ``.nii.gz``), else
    ``{"nan": n, "inf": n}`` (counts of non-finite voxels) and, for ``role="label"``, ``"values"``: the
    sorted distinct finite values (at most :data:`MAX_LISTED_VALUES`, ``"more_values"`` saying whether
    there were more). JSON-ready, for :class:`FileCache`.
    """
    try:
        proxy = nib.load(str(path)).dataobj
        # an image's values matter only for finiteness, which the stored values decide (a scaling by a
        # finite slope keeps them finite); a label's values are compared as scaled
        arr = np.asanyarray(proxy) if role == "label" else proxy.get_unscaled()
    except Exception as err:  # truncated gzip: EOFError, zlib.error, OSError; short raw data: ValueError
        return {"error": f"cannot read the voxels of {path} ({type(err).__name__}: {err})"}
    facts: dict[str, Any] = {"nan": 0, "inf": 0}
    if arr.dtype.kind in "fc":
        finite = np.isfinite(arr)
        if not finite.all():
            facts["nan"] = int(np.count_nonzero(np.isnan(arr)))
            facts["inf"] = int(arr.size - np.count_nonzero(finite) - facts["nan"])
    if role == "label":
        values = _distinct_values(arr)
        facts["values"] = values[:MAX_LISTED_VALUES].tolist()
        facts["more_values"] = bool(values.size > MAX_LISTED_VALUES)
    return facts


class FileCache:
    """What validation learnt of each file (its header, :func:`read_header`, and what its voxels held,
    :func:`read_voxel_facts`, per role), kept in a json file and keyed by the file's absolute path, size
    and modification time (ns): a file that is replaced or touched is read again, an unchanged one never.

    Args:
        path: the cache file; ``None`` keeps nothing (every run reads every file).
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}  # a damaged cache is only a slower run: it is rewritten
            if isinstance(data, dict) and data.get("format") == FILE_CACHE_FORMAT and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        self._saved = json.dumps(self.entries, sort_keys=True)

    def entry(self, path: Path) -> dict:
        """The facts known of ``path`` as it is now (an empty dict to fill when it is new or changed)."""
        stat = path.stat()
        name = str(path.resolve())
        entry = self.entries.get(name)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns):
            entry = self.entries[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return entry

    def save(self) -> None:
        """Write the cache if anything was learnt (atomically: parallel ranks may race); an unwritable place
        only warns, the next run then reads the files again."""
        if self.path is None or json.dumps(self.entries, sort_keys=True) == self._saved:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FILE_CACHE_FORMAT, "files": self.entries}))
            os.replace(tmp, self.path)
        except OSError as err:
            warnings.warn(f"could not write the validation cache {self.path} ({err}); the next run reads every file again", stacklevel=3)


def _workers(max_workers: int | None) -> int:
    if max_workers is not None:
        return max(1, max_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def _read_facts(requests: list[tuple[Path, Role]], max_workers: int | None) -> list[dict]:
    """:func:`read_voxel_facts` of every request, by worker processes when there is enough to read.

    Worker processes are forked (Linux only), as PyTorch starts its DataLoader workers: a fork needs no
    ``if __name__ == "__main__"`` guard in the user's script, and the workers only run nibabel and numpy.
    """
    workers = min(_workers(max_workers), len(requests))
    size = sum(path.stat().st_size for path, _ in requests)
    fork = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    if workers > 1 and fork and size >= PROCESS_POOL_BYTES:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(read_voxel_facts, *zip(*requests)))
    if workers > 1 and size >= PROCESS_POOL_BYTES:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(read_voxel_facts, *zip(*requests)))
    return [read_voxel_facts(path, role) for path, role in requests]


def _voxel_files(case: CaseFiles) -> Iterable[tuple[Path, Role]]:
    yield from ((path, "image") for path in case.images)
    if case.label is not None:
        yield case.label, "label"


def _voxel_problems(case: CaseFiles, facts: dict[tuple[Path, Role], dict]) -> tuple[list[str], list[str]]:
    """(problems, warnings) of one case from its files' voxel facts."""
    problems: list[str] = []
    notes: list[str] = []
    for path, role in _voxel_files(case):
        found = facts[(path, role)]
        if "error" in found:
            problems.append(found["error"])
            continue
        if found["nan"] or found["inf"]:
            counts = ", ".join(f"{found[key]} {name}" for key, name in (("nan", "NaN"), ("inf", "Inf")) if found[key])
            problems.append(f"{'label ' if role == 'label' else ''}{path} has non-finite voxel values ({counts})")
        if role != "label":
            continue
        values = np.asarray(found["values"], dtype=np.float64)
        fractional = values[values != np.round(values)]
        if fractional.size:
            problems.append(f"label {path} has non-integer values {fractional[:5].tolist()}")
            continue
        whole = {int(v) for v in values}
        if case.label_values is not None:
            unexpected = sorted(whole - set(case.label_values))
            if unexpected:
                more = " and more" if found.get("more_values") else ""
                problems.append(f"label {path} has unexpected value(s) {unexpected[:10]}{more}; allowed {sorted(case.label_values)}")
                continue
        if not whole - {0} and case.empty_label != "allow":
            message = f"label {path} is empty (no foreground voxel)"
            if case.empty_label == "error":
                problems.append(message + "; set empty_labels: warn or allow to use it anyway")
            else:
                notes.append(message)
    return problems, notes


def validate_cases(
    cases: Sequence[CaseFiles],
    *,
    dataset: str,
    root: str | Path,
    check_voxels: bool = True,
    skip_bad_cases: bool = False,
    cache_file: str | Path | None = None,
    max_workers: int | None = None,
) -> tuple[list[CaseFiles], dict[str, str]]:
    """Check every case (headers, then with ``check_voxels`` the voxels of the cases whose headers are
    good); return the good cases and ``{case id: why}`` of the skipped ones.

    Empty labels of cases whose ``empty_label`` is ``warn`` are named in one warning and kept.
    ``cache_file``: where :class:`FileCache` keeps what each file held (``None``: no cache).

    Raises:
        InputError: no cases at all; any bad case when ``skip_bad_cases`` is False (one message listing
            every bad case and why); every case bad even when skipping.
    """
    if not cases:
        raise InputError(f"{dataset}: no cases found in {root}")
    cache = FileCache(cache_file)
    paths = list(dict.fromkeys(path for case in cases for path, _ in _voxel_files(case)))
    entries = {path: cache.entry(path) for path in paths if path.is_file()}
    unread = [path for path, entry in entries.items() if "header" not in entry]
    workers = _workers(max_workers)
    if workers > 1 and len(unread) >= 16:
        with ThreadPoolExecutor(max_workers=workers * 2) as pool:  # header reads wait on the disk: threads do
            headers = list(pool.map(read_header, unread))
    else:
        headers = [read_header(path) for path in unread]
    for path, header in zip(unread, headers):
        entries[path]["header"] = header
    known = {path: entry["header"] for path, entry in entries.items()}
    problems = {case.case_id: found for case in cases if (found := _header_problems(case, known))}
    notes: list[str] = []
    if check_voxels:
        readable = [case for case in cases if case.case_id not in problems]
        to_read = list(dict.fromkeys(r for case in readable for r in _voxel_files(case) if r[1] not in entries[r[0]]))
        if len(to_read) > 200:
            print(f"{dataset}: reading the voxels of {len(to_read)} files (once: remembered in {cache_file})", file=sys.stderr)
        if to_read:
            for (path, role), found in zip(to_read, _read_facts(to_read, max_workers)):
                entries[path][role] = found
        for case in readable:
            found, case_notes = _voxel_problems(case, {(path, role): entries[path][role] for path, role in _voxel_files(case)})
            if found:
                problems[case.case_id] = found
            notes += [f"  - {case.case_id}: {note}" for note in case_notes]
    cache.save()
    if notes:
        warnings.warn(f"{dataset}: {len(notes)} case(s) have an empty label (their Dice is undefined):\n" + "\n".join(notes), stacklevel=2)
    if not problems:
        return list(cases), {}
    reasons = {case.case_id: "; ".join(problems[case.case_id]) for case in cases if case.case_id in problems}
    lines = [f"  - {case_id}: {why}" for case_id, why in reasons.items()]
    head = f"{dataset}: {len(problems)} of {len(cases)} case(s) in {root} failed validation"
    if not skip_bad_cases:
        raise InputError(
            head + ":\n" + "\n".join(lines) + "\nFix or remove them, or set skip_bad_cases: true to skip them with a warning."
        )
    if len(problems) == len(cases):
        raise InputError(head + " (all of them; nothing left to skip to):\n" + "\n".join(lines))
    warnings.warn(head + "; skipping them:\n" + "\n".join(lines), stacklevel=2)
    return [c for c in cases if c.case_id not in problems], reasons
