"""Phantom generators and writers: deterministic, real NIfTI in the real layouts, marked synthetic."""

import json

import nibabel as nib
import numpy as np
import pytest

from segresmamba.data.phantoms import BTCV_ORGANS, HU_AIR, PHANTOM_MARKER, btcv_like, spleen_like
from segresmamba.data.write_phantoms import main, write_btcv_phantom, write_spleen_phantom


def test_btcv_like_is_ct_like_and_deterministic():
    image, label = btcv_like(32, seed=4, missing_gallbladder_prob=0.0)
    again = btcv_like(32, seed=4, missing_gallbladder_prob=0.0)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])
    assert not np.array_equal(image, btcv_like(32, seed=5)[0])
    assert set(np.unique(label)) == set(range(len(BTCV_ORGANS) + 1))
    assert image[0, 0, 0] == HU_AIR  # corner: air outside the body
    liver = BTCV_ORGANS.index("liver") + 1
    assert 60 < image[label == liver].mean() < 140
    x_of = lambda k: np.argwhere(label == k)[:, 0].mean()  # noqa: E731
    assert x_of(BTCV_ORGANS.index("spleen") + 1) < x_of(liver)  # RAS: spleen on the patient's left


def test_spleen_like():
    image, label = spleen_like(32, seed=0)
    assert image.shape == label.shape and set(np.unique(label)) == {0, 1}
    assert image.min() == HU_AIR


def test_writers_and_marker(tmp_path):
    root = write_btcv_phantom(tmp_path / "btcv", cases=3, size=24, seed=1)
    assert json.loads((root / PHANTOM_MARKER).read_text())["provenance"] == "synthetic"
    img = nib.load(str(root / "img" / "img0001.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert np.allclose(np.abs(np.diag(img.affine))[:3], (0.8, 0.8, 2.5))
    datalist = json.loads((root / "dataset_0.json").read_text())
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1
    # same seed, same voxels
    other = write_btcv_phantom(tmp_path / "btcv2", cases=3, size=24, seed=1)
    a = np.asanyarray(nib.load(str(root / "label" / "label0002.nii.gz")).dataobj)
    b = np.asanyarray(nib.load(str(other / "label" / "label0002.nii.gz")).dataobj)
    assert np.array_equal(a, b)
    # never written over a folder holding other data
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "something.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="will not write phantoms"):
        write_spleen_phantom(foreign, cases=2, size=16)


def test_cli(tmp_path, capsys):
    root = main(["spleen", "--out", str(tmp_path / "sp"), "--cases", "3", "--size", "16", "--seed", "2", "--test-cases", "1"])
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["test"] == ["./imagesTs/spleen_4.nii.gz"]
    assert (root / "labelsTr" / "spleen_3.nii.gz").is_file() and "wrote spleen phantom" in capsys.readouterr().out
