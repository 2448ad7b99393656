"""Write synthetic phantoms to disk in the real datasets' layouts (NIfTI files + json).

The files are real ``.nii.gz`` volumes, laid out exactly as the adapters expect the public datasets:

- ``brats``: ``<out>/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz`` (BraTS 2021,
  Baid et al. 2021), 1 mm isotropic, labels 0/1/2/4.
- ``btcv``: ``<out>/img/imgXXXX.nii.gz`` + ``<out>/label/labelXXXX.nii.gz`` and a MONAI-style
  ``<out>/dataset_0.json`` with "training"/"validation" lists (BTCV, Landman et al. 2015), CT in HU at
  :data:`~segresmamba.data.phantoms.CT_SPACING`, stored in an LPS-like orientation so that the RAS
  reorientation of the recipe has work to do; labels 0..13.
- ``spleen``: Medical Segmentation Decathlon Task09 (Antonelli et al. 2022): ``<out>/dataset.json``,
  ``imagesTr/spleen_N.nii.gz``, ``labelsTr/spleen_N.nii.gz`` and unlabelled ``imagesTs/``.
- ``msd``: the same Decathlon layout with several modalities stored as one 4D image per case.

Every root gets a ``PHANTOM.json`` marker; the adapters read it and label all results "synthetic".
Volumes are deterministic functions of ``--seed`` (case ``i`` uses seed ``seed * 1_000_003 + i``).

Usage::

    python -m segresmamba.data.write_phantoms {brats,btcv,spleen,msd} --out DIR --cases N --size S --seed K
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from segresmamba.data.phantoms import (
    BRATS_CHANNELS,
    BTCV_ORGANS,
    CT_SPACING,
    PHANTOM_MARKER,
    brats_like,
    btcv_like,
    spleen_like,
)

__all__ = [
    "write_brats_phantom",
    "write_btcv_phantom",
    "write_msd_phantom",
    "write_spleen_phantom",
    "main",
]


def _case_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def _prepare_root(out: str | Path, kind: str, **facts) -> Path:
    """Create ``out`` (refusing a folder that holds other data) and drop the phantom marker."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"phantom output {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / PHANTOM_MARKER).is_file():
        raise ValueError(
            f"will not write phantoms into {root}: it already holds files and no {PHANTOM_MARKER}; "
            "choose an empty or new folder"
        )
    root.mkdir(parents=True, exist_ok=True)
    marker = {
        "provenance": "synthetic",
        "kind": kind,
        "generator": "segresmamba.data.write_phantoms",
        "note": "synthetic phantom written in a public dataset's layout; not patient data",
        **facts,
    }
    (root / PHANTOM_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return root


def _ct_affine(shape: Sequence[int], spacing: Sequence[float] = CT_SPACING) -> np.ndarray:
    """RAS+ affine with the volume centred on the world origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) * s / 2.0 for n, s in zip(shape, spacing)]
    return affine


def _save_lps(data: np.ndarray, ras_affine: np.ndarray, path: Path, dtype) -> None:
    """Save a RAS-ordered array reoriented to LPS storage (x and y flipped, as in many CT exports)."""
    img = nib.Nifti1Image(data.astype(dtype), ras_affine)
    lps = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    img = img.as_reoriented(lps)
    img.set_data_dtype(dtype)
    nib.save(img, str(path))


def write_brats_phantom(out: str | Path, cases: int = 4, size: int = 48, seed: int = 0) -> Path:
    """BraTS 2021 layout: one folder per case with four MR channels and a 0/1/2/4 segmentation.

    Voxels are 1 mm isotropic (LPS-like affine, as in BraTS); channels come from
    :func:`~segresmamba.data.phantoms.brats_like` (stored as int16, MR-like units).
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    root = _prepare_root(out, "brats", cases=cases, size=size, seed=seed)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i in range(cases):
        case = f"BraTS2021_{i:05d}"
        folder = root / case
        folder.mkdir(exist_ok=True)
        image, seg = brats_like(size, seed=_case_seed(seed, i))
        for channel, name in enumerate(BRATS_CHANNELS):
            nib.save(nib.Nifti1Image(np.round(image[channel]).astype(np.int16), affine), str(folder / f"{case}_{name}.nii.gz"))
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), str(folder / f"{case}_seg.nii.gz"))
    return root


def write_btcv_phantom(
    out: str | Path, cases: int = 6, size: int = 48, seed: int = 0, num_val: int | None = None
) -> Path:
    """BTCV layout: ``img/imgXXXX.nii.gz``, ``label/labelXXXX.nii.gz`` and ``dataset_0.json``.

    ``dataset_0.json`` follows MONAI's BTCV datalist (``training``/``validation`` lists of
    ``{"image", "label"}`` with paths relative to the json); its validation list is the last ``num_val``
    cases (default a fifth, at least one).
    """
    if cases < 2:
        raise ValueError(f"cases must be >= 2 (training and validation lists), got {cases}")
    root = _prepare_root(out, "btcv", cases=cases, size=size, seed=seed)
    (root / "img").mkdir(exist_ok=True)
    (root / "label").mkdir(exist_ok=True)
    entries = []
    for i in range(1, cases + 1):
        image, label = btcv_like(size, seed=_case_seed(seed, i))
        affine = _ct_affine(image.shape)
        _save_lps(np.round(image), affine, root / "img" / f"img{i:04d}.nii.gz", np.int16)
        _save_lps(label, affine, root / "label" / f"label{i:04d}.nii.gz", np.uint8)
        entries.append({"image": f"img/img{i:04d}.nii.gz", "label": f"label/label{i:04d}.nii.gz"})
    n_val = max(1, cases // 5) if num_val is None else num_val
    if not 1 <= n_val < cases:
        raise ValueError(f"num_val must be within [1, {cases - 1}], got {n_val}")
    datalist = {
        "description": "BTCV-like synthetic phantom (Multi-Atlas Labeling Beyond the Cranial Vault layout)",
        "labels": {"0": "background", **{str(i + 1): name for i, name in enumerate(BTCV_ORGANS)}},
        "modality": {"0": "CT"},
        "name": "btcv_phantom",
        "numTraining": cases - n_val,
        "numTest": 0,
        "tensorImageSize": "3D",
        "training": entries[: cases - n_val],
        "validation": entries[cases - n_val :],
        "test": [],
    }
    (root / "dataset_0.json").write_text(json.dumps(datalist, indent=2) + "\n")
    return root


def _extra_contrast(ct: np.ndarray, body: np.ndarray, channel: int, rng: np.random.Generator) -> np.ndarray:
    """An MR-like channel derived from a CT-like phantom: zero outside the body, a per-channel tissue
    contrast (inverted on odd channels), its own noise."""
    sign = -1.0 if channel % 2 else 1.0
    soft = np.clip(ct, -150.0, 250.0)
    vol = 500.0 + sign * 1.5 * soft + rng.normal(0.0, 15.0, size=ct.shape)
    return (np.clip(vol, 0.0, None) * body).astype(np.float32)


def write_msd_phantom(
    out: str | Path,
    cases: int = 41,
    size: int = 48,
    seed: int = 0,
    test_cases: int = 0,
    modalities: Sequence[str] = ("CT",),
    task_name: str = "Spleen",
    file_prefix: str = "spleen",
) -> Path:
    """Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``).

    The anatomy is :func:`~segresmamba.data.phantoms.spleen_like` (label 1 = spleen). With one modality
    the image is 3D CT in HU; with several it is 4D ``(X, Y, Z, C)``, channel 0 CT-like and the others
    MR-like contrasts, as the Decathlon stores multi-modal tasks. ``test_cases`` unlabelled images go to
    ``imagesTs`` and the json's ``test`` list (path strings, as in the Decathlon).
    """
    if cases < 2:
        raise ValueError(f"cases must be >= 2, got {cases}")
    if not modalities:
        raise ValueError("modalities must name at least one modality")
    root = _prepare_root(
        out, "msd", cases=cases, size=size, seed=seed, test_cases=test_cases, modalities=list(modalities)
    )
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(exist_ok=True)

    def volume(index: int) -> tuple[np.ndarray, np.ndarray]:
        ct, label = spleen_like(size, seed=_case_seed(seed, index))
        if len(modalities) == 1:
            return ct, label
        rng = np.random.default_rng(_case_seed(seed, index) + 7)
        body = ct > -500.0
        chans = [ct] + [_extra_contrast(ct, body, c, rng) for c in range(1, len(modalities))]
        return np.stack(chans, axis=-1), label

    training, test = [], []
    for i in range(1, cases + test_cases + 1):
        image, label = volume(i)
        affine = _ct_affine(label.shape)
        name = f"{file_prefix}_{i}.nii.gz"
        labelled = i <= cases
        img_dir = "imagesTr" if labelled else "imagesTs"
        nib.save(nib.Nifti1Image(np.round(image).astype(np.int16), affine), str(root / img_dir / name))
        if labelled:
            nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(root / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    dataset = {
        "name": task_name,
        "description": f"{task_name}-like synthetic phantom in Medical Segmentation Decathlon layout",
        "reference": "segresmamba synthetic phantom (not patient data)",
        "licence": "CC-BY-SA 4.0",
        "release": "synthetic",
        "tensorImageSize": "3D" if len(modalities) == 1 else "4D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": cases,
        "numTest": test_cases,
        "training": training,
        "test": test,
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    return root


def write_spleen_phantom(
    out: str | Path, cases: int = 41, size: int = 48, seed: int = 0, test_cases: int = 0
) -> Path:
    """MSD Task09 Spleen layout (CT, labels 0 background / 1 spleen; the real set has 41 labelled and 20
    unlabelled test cases)."""
    return write_msd_phantom(out, cases=cases, size=size, seed=seed, test_cases=test_cases)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m segresmamba.data.write_phantoms",
        description="Write a synthetic phantom dataset in a public dataset's on-disk layout.",
    )
    parser.add_argument("kind", choices=["brats", "btcv", "spleen", "msd"])
    parser.add_argument("--out", required=True, help="output folder (created; must be empty or a phantom)")
    parser.add_argument("--cases", type=int, default=None, help="labelled cases (default: brats 4, btcv 6, spleen/msd 41)")
    parser.add_argument("--size", type=int, default=48, help="volume side in voxels (CT: in-plane side)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-cases", type=int, default=0, help="spleen/msd: unlabelled imagesTs cases")
    parser.add_argument("--modalities", nargs="+", default=["CT"], help="msd: modality names (several -> 4D images)")
    args = parser.parse_args(argv)
    if args.kind == "brats":
        root = write_brats_phantom(args.out, cases=args.cases or 4, size=args.size, seed=args.seed)
    elif args.kind == "btcv":
        root = write_btcv_phantom(args.out, cases=args.cases or 6, size=args.size, seed=args.seed)
    elif args.kind == "spleen":
        root = write_spleen_phantom(args.out, cases=args.cases or 41, size=args.size, seed=args.seed, test_cases=args.test_cases)
    else:
        root = write_msd_phantom(
            args.out, cases=args.cases or 41, size=args.size, seed=args.seed, test_cases=args.test_cases,
            modalities=args.modalities, task_name="Phantom", file_prefix="case",
        )
    print(f"wrote {args.kind} phantom to {root}")
    return root


if __name__ == "__main__":
    main()
