import numpy as np
import pytest
import tifffile

from efficientbioai.errors import EfficientBioAIError
from efficientbioai.io import expand_paths, read_image, to_model_layout
from efficientbioai.metrics import dice, iou, pearson, relative_l2
from efficientbioai.sampling import sample_tiles


def test_read_tiff_and_npy_round_trip(tmp_path):
    a = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", a)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), a)
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), a)
    assert [p.name for p in expand_paths(tmp_path)] == ["a.npy", "a.tif"]
    assert [p.name for p in expand_paths(tmp_path / "*.tif")] == ["a.tif"]


def test_bad_files_are_named(tmp_path):
    (tmp_path / "notes.tif").write_text("not an image")
    with pytest.raises(EfficientBioAIError, match="could not read .*notes.tif"):
        read_image(tmp_path / "notes.tif")
    with pytest.raises(EfficientBioAIError, match="nothing found"):
        expand_paths(tmp_path / "*.npy", "calibration.images")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(EfficientBioAIError, match="unsupported image format"):
        read_image(tmp_path / "x.png")


@pytest.mark.parametrize(
    "shape, axes, model_axes, expected",
    [
        ((8, 9), None, "bcyx", (1, 8, 9)),
        ((2, 8, 9), None, "bcyx", (2, 8, 9)),
        ((8, 9, 3), "yxc", "bcyx", (3, 8, 9)),
        ((4, 8, 9), None, "bczyx", (1, 4, 8, 9)),
        ((4, 2, 8, 9), "zcyx", "bczyx", (2, 4, 8, 9)),
    ],
)
def test_to_model_layout(shape, axes, model_axes, expected):
    x = np.random.default_rng(0).random(shape)
    y = to_model_layout(x, axes, model_axes)
    assert y.shape == expected
    if axes == "yxc":
        np.testing.assert_array_equal(y[1], x[..., 1])


def test_wrong_axes_are_explained():
    with pytest.raises(EfficientBioAIError, match="model takes 3D images"):
        to_model_layout(np.zeros((2, 3, 4, 5, 6)), None, "bczyx")
    with pytest.raises(EfficientBioAIError, match="do not describe"):
        to_model_layout(np.zeros((4, 5)), "zyx", "bcyx")


def test_metrics_hand_computed():
    a = np.array([1.0, 2.0, 3.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1)
    assert pearson(a, -a) == pytest.approx(-1)
    assert relative_l2(np.array([3.0, 4.0]), np.array([0.0, 5.0])) == pytest.approx(np.sqrt(10) / 5)
    m1 = np.array([1, 1, 0, 0], bool)
    m2 = np.array([1, 0, 1, 0], bool)
    assert iou(m1, m2) == pytest.approx(1 / 3)
    assert dice(m1, m2) == pytest.approx(0.5)


def test_sampling_limits_background_and_separates_holdout():
    img = np.zeros((1, 256, 256), np.float32)
    img[:, :64, :64] = np.random.default_rng(0).random((64, 64)) * 10  # sample fills 1/16 of the image
    img += np.random.default_rng(1).normal(0, 0.01, img.shape).astype(np.float32)
    calib, hold = sample_tiles([img], (32, 32), 16, 4, background_fraction=0.25, seed=0)
    assert len(calib.inputs) == 16 and len(hold.inputs) == 4
    assert calib.background + hold.background <= 5
    content = sum(float(t.max()) > 1 for t in calib.inputs + hold.inputs)
    assert content >= 15  # uniform sampling would give ~1/16 × 20 ≈ 2 content tiles
    assert not set(calib.positions) & set(hold.positions)
    # per-tile flags, so that a split of the tiles (calibration / validation) counts its own background
    for tiles in (calib, hold):
        assert len(tiles.is_background) == len(tiles.inputs) and sum(tiles.is_background) == tiles.background
        flagged = [float(t.max()) for t, bg in zip(tiles.inputs, tiles.is_background, strict=True) if bg]
        assert all(m < 1 for m in flagged)  # background tiles are the empty ones


def test_sampling_pads_small_images():
    img = np.ones((1, 10, 12), np.float32)
    calib, hold = sample_tiles([img], (16, 16), 2, 1)
    assert all(t.shape == (1, 16, 16) for t in calib.inputs + hold.inputs)
