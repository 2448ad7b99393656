"""Splits: seeded, order-independent, written to and read back from files; brats21_folds.json format."""

import json
import random

import pytest

from segresmamba.data.splits import (
    holdout_split,
    kfold_split,
    load_or_create_split,
    read_brats_folds,
    split_for_fold,
)

IDS = [f"case{i:02d}" for i in range(10)]


def test_kfold_is_pinned_disjoint_and_order_independent():
    folds = kfold_split(IDS, 5, seed=0)
    # pinned: numpy's PCG64 default_rng permutation is the same on every machine
    assert folds == [["case04", "case06"], ["case02", "case07"], ["case03", "case05"], ["case00", "case09"], ["case01", "case08"]]
    shuffled = IDS[:]
    random.Random(1).shuffle(shuffled)
    assert kfold_split(shuffled, 5, seed=0) == folds
    assert sorted(c for f in folds for c in f) == IDS
    assert kfold_split(IDS, 5, seed=1) != folds
    split = split_for_fold(folds, 2)
    assert split.val == ["case03", "case05"] and len(split.train) == 8 and not set(split.train) & set(split.val)


def test_holdout_sizes():
    ids = [f"{i:04d}" for i in range(1, 31)]
    train, val = holdout_split(ids, 6, seed=0)
    assert len(train) == 24 and len(val) == 6 and set(train) | set(val) == set(ids)
    assert holdout_split(ids, 6, seed=0) == (train, val)
    with pytest.raises(ValueError, match="num_val"):
        holdout_split(ids, 30)


def test_split_file_written_and_reread(tmp_path):
    path = tmp_path / "splits" / "x.json"
    a = load_or_create_split(IDS, dataset="x", scheme="kfold", fold=1, num_folds=5, seed=3, path=path)
    record = json.loads(path.read_text())
    assert record["format"] == "segresmamba-split-v1" and record["seed"] == 3 and len(record["folds"]) == 5
    b = load_or_create_split(IDS, dataset="x", scheme="kfold", fold=1, num_folds=5, seed=99, path=path)
    assert a == b  # an existing file is authoritative
    with pytest.raises(ValueError, match="does not match the dataset"):
        load_or_create_split(IDS[:-1], dataset="x", scheme="kfold", fold=1, num_folds=5, path=path)
    with pytest.raises(ValueError, match="'kfold' split but split='holdout'"):
        load_or_create_split(IDS, dataset="x", scheme="holdout", num_val=2, path=path)
    with pytest.raises(ValueError, match="needs split 'kfold'"):
        load_or_create_split(IDS, dataset="x", scheme="holdout", fold=1, num_val=2)


def test_read_brats_folds(tmp_path):
    entries = [
        {
            "fold": i % 3,
            "image": [f"TrainingData/BraTS2021_{i:05d}/BraTS2021_{i:05d}_{m}.nii.gz" for m in ("flair", "t1ce", "t1", "t2")],
            "label": f"TrainingData/BraTS2021_{i:05d}/BraTS2021_{i:05d}_seg.nii.gz",
        }
        for i in range(6)
    ]
    path = tmp_path / "brats21_folds.json"
    path.write_text(json.dumps({"training": entries}))
    assert read_brats_folds(path) == {f"BraTS2021_{i:05d}": i % 3 for i in range(6)}
    path.write_text(json.dumps({"training": [{"image": []}]}))
    with pytest.raises(ValueError, match="needs 'fold' and 'label'"):
        read_brats_folds(path)
