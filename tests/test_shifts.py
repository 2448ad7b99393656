"""Acquisition shifts: geometry kept in world space, requested grids and orientations, seeded determinism."""

import nibabel as nib
import numpy as np
import pytest

from segresmamba.data import shifts

AFFINE = np.array([[2.0, 0, 0, -20.0], [0, 2.0, 0, -30.0], [0, 0, 2.0, -12.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def pair():
    """A 'head' (ellipsoid of intensity 0.5 with a brighter core labelled 1..3) in air, 2 mm RAS."""
    shape = (20, 24, 16)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.9, 0.8])[:, None, None, None]) ** 2).sum(0))
    image = np.where(r < 1, 0.5, 0.0).astype(np.float32) + np.where(r < 0.6, 0.4, 0.0).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[r < 0.6] = 1
    label[(r < 0.6) & (grid[0] > 0.1)] = 2
    label[(r < 0.6) & (grid[2] > 0.2)] = 3
    return nib.Nifti1Image(image, AFFINE), nib.Nifti1Image(label, AFFINE)


def world_centroids(label: nib.Nifti1Image) -> dict[int, np.ndarray]:
    data = np.asarray(label.dataobj)
    out = {}
    for value in range(1, 4):
        voxels = np.argwhere(data == value)
        out[value] = nib.affines.apply_affine(label.affine, voxels.mean(0))
    return out


@pytest.mark.parametrize("name", shifts.list_shifts())
def test_label_overlays_original_in_world_space(pair, name):
    image, label = pair
    new_image, new_label = shifts.apply_shift(name, image, label, seed=3)
    assert new_image.shape == new_label.shape
    assert np.allclose(new_image.affine, new_label.affine)
    assert new_label.get_data_dtype() == np.uint8 and new_image.get_data_dtype() == np.float32
    assert set(np.unique(np.asarray(new_label.dataobj))) <= {0, 1, 2, 3}
    voxel = max(nib.affines.voxel_sizes(new_label.affine))
    before, after = world_centroids(label), world_centroids(new_label)
    for value in before:
        assert np.linalg.norm(before[value] - after[value]) < voxel, (name, value, before[value], after[value])


def test_resolution_grid_and_slice_profile(pair):
    image, label = pair
    new_image, new_label = shifts.change_voxel_size(image, label, voxel_size=(1.2, 1.2, 3.0))
    assert np.allclose(nib.affines.voxel_sizes(new_image.affine), (1.2, 1.2, 3.0))
    assert nib.aff2axcodes(new_image.affine) == ("R", "A", "S")
    assert new_image.shape == (34, 40, 11)  # same field of view: 40 x 48 x 32 mm
    assert float(np.asarray(new_image.dataobj).min()) >= 0.0  # linear interpolation: no undershoot into air
    # the thick axis is smoothed over its slice profile: fewer distinct sharp steps along it than a point sample
    point_sampled = nib.processing.conform(image, out_shape=new_image.shape, voxel_size=(1.2, 1.2, 3.0), order=1, orientation="RAS")
    assert np.abs(np.diff(np.asarray(new_image.dataobj), axis=2)).max() < np.abs(np.diff(point_sampled.get_fdata(), axis=2)).max()


def test_orientation_is_exact(pair):
    image, label = pair
    new_image, new_label = shifts.reorient(image, label, "LSA")
    assert nib.aff2axcodes(new_image.affine) == ("L", "S", "A")
    assert new_image.shape == (20, 16, 24)
    back_image, back_label = shifts.reorient(new_image, new_label, "RAS")
    assert np.allclose(back_image.affine, AFFINE)
    assert np.array_equal(np.asarray(back_label.dataobj), np.asarray(label.dataobj))
    assert np.array_equal(np.asarray(back_image.dataobj), np.asarray(image.dataobj))


def test_field_of_view_pads_with_air(pair):
    image, label = pair
    new_image, new_label = shifts.enlarge_field_of_view(image, label, growth=0.5, seed=1)
    assert new_image.shape == (30, 36, 24)
    data, lab = np.asarray(new_image.dataobj), np.asarray(new_label.dataobj)
    # where the original sits: its corner voxel's world position, mapped into the new grid
    corner = np.rint(nib.affines.apply_affine(np.linalg.inv(new_image.affine), AFFINE[:3, 3])).astype(int)
    inside = tuple(slice(c, c + n) for c, n in zip(corner, image.shape))
    assert np.array_equal(data[inside], np.asarray(image.dataobj))
    assert np.array_equal(lab[inside], np.asarray(label.dataobj))
    outside = np.ones(data.shape, bool)
    outside[inside] = False
    assert outside.sum() == data.size - image.get_fdata().size
    assert (data[outside] == 0).all() and (lab[outside] == 0).all()


def test_intensity_shifts_keep_label_and_air(pair):
    image, label = pair
    biased, biased_label = shifts.bias_field(image, label, seed=0)
    assert biased_label is label
    air = np.asarray(image.dataobj) == 0
    assert (np.asarray(biased.dataobj)[air] == 0).all()
    ratio = np.asarray(biased.dataobj)[~air] / np.asarray(image.dataobj)[~air]
    assert ratio.min() > 0.3 and ratio.max() < 3 and ratio.std() > 0.01  # smooth, varying, positive
    darker, _ = shifts.gamma_contrast(image, label, gamma=2.0)
    # range kept, the mid-grey (0.5 of 0.9) darkened
    assert np.isclose(np.asarray(darker.dataobj).max(), 0.9, atol=1e-4)
    assert np.asarray(darker.dataobj)[np.isclose(np.asarray(image.dataobj), 0.5)].max() < 0.35
    noisy, _ = shifts.rician_noise(image, label, relative_std=0.05, seed=0)
    noise_in_air = np.asarray(noisy.dataobj)[air]
    assert (noise_in_air > 0).mean() > 0.99  # magnitude noise: air is no longer zero
    assert 0.03 < noise_in_air.mean() < 0.09  # Rayleigh mean sigma * sqrt(pi / 2), sigma = 0.05 * 0.9


@pytest.mark.parametrize("name", ["field_of_view", "bias_field", "noise", "all"])
def test_seeded_determinism(pair, name):
    image, label = pair
    first = shifts.apply_shift(name, image, label, seed=5)
    again = shifts.apply_shift(name, image, label, seed=5)
    other = shifts.apply_shift(name, image, label, seed=6)
    assert np.array_equal(np.asarray(first[0].dataobj), np.asarray(again[0].dataobj))
    assert np.array_equal(first[0].affine, again[0].affine)
    assert not (first[0].shape == other[0].shape and np.array_equal(np.asarray(first[0].dataobj), np.asarray(other[0].dataobj)))


def test_all_combines_every_shift(pair):
    image, label = pair
    new_image, _ = shifts.apply_shift("all", image, label, seed=0)
    assert nib.aff2axcodes(new_image.affine) == ("L", "S", "A")
    assert sorted(np.round(nib.affines.voxel_sizes(new_image.affine), 3)) == [1.2, 1.2, 3.0]
    assert (np.asarray(new_image.dataobj) > 0).mean() > 0.99  # air padded, then noisy


def test_bad_input(pair):
    image, label = pair
    with pytest.raises(ValueError, match="unknown acquisition shift 'blur'"):
        shifts.apply_shift("blur", image, label)
    with pytest.raises(ValueError, match="shapes? .* differ"):
        shifts.apply_shift("noise", image, label.slicer[:10])
    with pytest.raises(ValueError, match="voxel_size"):
        shifts.change_voxel_size(image, label, voxel_size=(1.0, 0.0, 2.0))
    with pytest.raises(ValueError, match="axcodes 'LLA'"):
        shifts.reorient(image, label, "LLA")
