"""Labelled external test scans (``test_dir``): file pairing, clear errors, and reading them like training data."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from segresmamba.data import MNI152TissueDataModule, MSDDataModule
from segresmamba.data.external import pair_test_dir, read_test_dir, write_test_case
from segresmamba.data.mni152 import mni152_tissue_volumes
from segresmamba.data.shifts import reorient
from segresmamba.data.write_phantoms import write_msd_phantom


def _pair(shape=(8, 9, 7), value=1):
    label = np.zeros(shape, np.uint8)
    label[2:5, 2:6, 2:5] = value
    return nib.Nifti1Image(np.random.default_rng(0).random(shape, dtype=np.float32), np.eye(4)), nib.Nifti1Image(label, np.eye(4))


def _touch(root, *names):
    image, label = _pair()
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(label if name.startswith("labelsTs") else image, str(path))


def test_pairing_with_and_without_channel_suffix(tmp_path):
    _touch(tmp_path, "imagesTs/a_0000.nii.gz", "labelsTs/a.nii.gz", "imagesTs/b.nii", "labelsTs/b.nii.gz")
    (tmp_path / "imagesTs" / "._a_0000.nii.gz").write_bytes(b"AppleDouble")  # hidden files are ignored
    pairs = pair_test_dir(tmp_path)
    assert sorted(pairs) == ["a", "b"]
    assert pairs["a"][0] == (tmp_path / "imagesTs" / "a_0000.nii.gz",) and pairs["a"][1].name == "a.nii.gz"
    assert pairs["b"][0] == (tmp_path / "imagesTs" / "b.nii",)
    items = read_test_dir(tmp_path, dataset="d", channels=1, label_values=[0, 1])
    assert [i["case_id"] for i in items] == ["a", "b"] and isinstance(items[0]["image"], str)


def test_multichannel_cases_list_their_files_in_order(tmp_path):
    _touch(tmp_path, "imagesTs/c_0001.nii.gz", "imagesTs/c_0000.nii.gz", "labelsTs/c.nii.gz")
    (item,) = read_test_dir(tmp_path, dataset="d", channels=2, label_values=None)
    assert [p.rsplit("/", 1)[-1] for p in item["image"]] == ["c_0000.nii.gz", "c_0001.nii.gz"]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["imagesTs/a_0000.nii.gz"], r"has no labelsTs/ folder"),
        (["imagesTs/a_0000.nii.gz", "labelsTs/a.nii.gz", "imagesTs/b_0000.nii.gz"], r"image .*imagesTs/b_0000.nii.gz has no label .*labelsTs/b.nii.gz"),
        (["imagesTs/a_0000.nii.gz", "labelsTs/a.nii.gz", "labelsTs/c.nii.gz"], r"label .*labelsTs/c.nii.gz has no image .*imagesTs/c_0000.nii.gz"),
        (["imagesTs/a_0000.nii.gz", "imagesTs/a_0002.nii.gz", "labelsTs/a.nii.gz"], r"case 'a' has channel files \[0, 2\]"),
        (["imagesTs/a.nii.gz", "imagesTs/a.nii", "labelsTs/a.nii.gz"], r"same case in two formats"),
        (["imagesTs/a_0000.nii.gz", "labelsTs/a.nii.gz", "imagesTs/b_0000.nii.gz", "imagesTs/b_0001.nii.gz", "labelsTs/b.nii.gz"],
         r"different numbers of channel files: \[1, 2\]"),
    ],
)
def test_bad_layouts_name_the_file(tmp_path, files, message):
    _touch(tmp_path, *files)
    with pytest.raises(ValueError, match=message):
        pair_test_dir(tmp_path)


def test_bad_files_and_values(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        pair_test_dir(tmp_path / "nowhere")
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "labelsTs").mkdir()
    with pytest.raises(ValueError, match="no labelled cases"):
        pair_test_dir(tmp_path)
    (tmp_path / "imagesTs" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt is not a NIfTI file"):
        pair_test_dir(tmp_path)
    (tmp_path / "imagesTs" / "notes.txt").unlink()
    image, label = _pair(value=7)
    write_test_case(tmp_path, "a", image, label)
    with pytest.raises(ValueError, match=r"(?s)1 of 1 case\(s\).*labelsTs/a.nii.gz has unexpected value\(s\) \[7\]"):
        read_test_dir(tmp_path, dataset="d", channels=1, label_values=[0, 1])
    with pytest.raises(ValueError, match=r"(?s)1 of 1 case\(s\).*- a: .*channel"):
        read_test_dir(tmp_path, dataset="d", channels=2, label_values=None)
    with pytest.raises(ValueError, match=r"imagesTs has no imagesTs/ folder"):  # at construction, before any work
        MNI152TissueDataModule(test_dir=str(tmp_path / "imagesTs"))


def test_mni152_reads_an_external_scan_like_its_own_test_slab(tmp_path):
    """The held-out slab, written with its true affine and stored as LSA, reads back as the in-memory test volume."""
    dm = MNI152TissueDataModule(resolution=2, fold=0, patch_size=32)
    dm.setup("test")
    v0, v1 = dm.slabs["val"]
    image, label, affine = mni152_tissue_volumes(2)
    index = [slice(None)] * 3
    index[dm.axis_index] = slice(v0, v1)
    slab = nib.Nifti1Image(image, affine).slicer[tuple(index)], nib.Nifti1Image(label, affine).slicer[tuple(index)]
    write_test_case(tmp_path, "slab", *reorient(*slab, "LSA"))
    external = MNI152TissueDataModule(resolution=2, fold=0, patch_size=32, test_dir=str(tmp_path))
    assert external.describe()["test_dir"] == str(tmp_path)
    batch = next(iter(external.test_dataloader()))
    own = dm.items("test")[0]
    assert batch["case_id"] == ["slab"]
    assert np.array_equal(np.asarray(batch["label"][0]), own["label"])
    assert np.allclose(np.asarray(batch["image"][0]), own["image"], atol=1e-4)
    assert len(external.items("test")) == 1 and external.items("val")[0]["case_id"] == own["case_id"]  # only test is replaced


def test_msd_test_dir_replaces_the_test_split(tmp_path):
    root = write_msd_phantom(tmp_path / "task", cases=3, size=16, modalities=("MR",))
    test_dir = tmp_path / "external"
    for case in sorted((root / "imagesTr").glob("*.nii.gz"))[:2]:
        stem = case.name.removesuffix(".nii.gz")
        (test_dir / "imagesTs").mkdir(parents=True, exist_ok=True)
        (test_dir / "labelsTs").mkdir(parents=True, exist_ok=True)
        shutil.copy(case, test_dir / "imagesTs" / f"{stem}_0000.nii.gz")
        shutil.copy(root / "labelsTr" / case.name, test_dir / "labelsTs" / case.name)
    dm = MSDDataModule(root=str(root), num_val=1, patch_size=16, split_file=str(tmp_path / "s.json"), test_dir=str(test_dir))
    batches = list(dm.test_dataloader())
    assert len(batches) == 2 and batches[0]["image"].shape[:2] == (1, 1)
    assert [b["case_id"][0] for b in batches] == sorted(p.name.removesuffix(".nii.gz") for p in (test_dir / "labelsTs").iterdir())
