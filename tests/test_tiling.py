"""Sliding-window tiling: exact stitching, padding, halo, blending, background skipping."""

from __future__ import annotations

import numpy as np
import pytest

from efficientbioai.engines import Engine, OpenVINOEngine
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.infer.predict import Predictor, split_pointwise
from efficientbioai.tiling import TileGrid, blend_weights, box_difference, check_tile_shape, round_up


class Identity(Engine):
    """Returns its input: stitching must then reproduce the image exactly."""

    backend = "identity"

    def __init__(self):
        self.shapes = []

    def __call__(self, batch):
        self.shapes.append(tuple(batch.shape))
        return np.array(batch, copy=True)


class Offset(Engine):
    """Input + the tile's batch position: lets a test see that outputs are not mixed up between tiles."""

    backend = "offset"

    def __call__(self, batch):
        return batch * 2.0 + 1.0


def _predict(image, tile, **kw):
    engine = kw.pop("engine", None) or Identity()
    p = Predictor(
        engine=engine, axes="bc" + "zyx"[-len(tile) :], out_channels=image.shape[0], tile_shape=tile, **kw
    )
    return p(image), engine


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "blend"),
    [
        ((1, 97, 131), (32, 48), 0.25, "gaussian"),
        ((1, 97, 131), (32, 48), 0.5, "constant"),
        ((2, 33, 65), (16, 16), 0.0, "gaussian"),  # two channels, no overlap
        ((1, 5, 7), (16, 16), 0.25, "gaussian"),  # smaller than one tile
        ((1, 19, 45, 38), (8, 16, 16), 0.25, "gaussian"),  # 3D, odd sizes
        ((1, 3, 17, 9), (8, 16, 16), 0.4, "constant"),  # 3D, thinner than a tile in z and x
    ],
)
def test_identity_stitching_is_exact(shape, tile, overlap, blend):
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape).astype(np.float32)
    pred, engine = _predict(image, tile, overlap=overlap, blend=blend)
    np.testing.assert_allclose(pred.output, image, rtol=1e-6, atol=1e-6)
    assert pred.output.shape == image.shape
    # a constant blend of integer values is bit-exact
    ints = rng.integers(0, 1000, shape).astype(np.float32)
    out, _ = _predict(ints, tile, overlap=overlap, blend="constant")
    assert np.array_equal(out.output, ints)
    # every engine call saw one tile shape, and it was no larger than needed
    assert len({s[2:] for s in engine.shapes}) == 1


def test_engine_only_sees_valid_shapes_with_halo():
    image = np.random.default_rng(1).standard_normal((1, 70, 101)).astype(np.float32)
    tile_min, tile_step = (16, 16), (8, 8)
    pred, engine = _predict(
        image, (40, 48), halo=(4, 6), tile_min=tile_min, tile_step=tile_step, overlap=0.25
    )
    np.testing.assert_allclose(pred.output, image, rtol=1e-6, atol=1e-6)
    for s in engine.shapes:
        assert all((n - m) % st == 0 and n >= m for n, m, st in zip(s[2:], tile_min, tile_step, strict=True))
    # a tiny image gets the smallest valid tile that covers it plus its halo
    small = np.ones((1, 5, 3), np.float32)
    pred, engine = _predict(small, (40, 48), halo=(4, 6), tile_min=tile_min, tile_step=tile_step)
    assert engine.shapes == [(1, 1, 16, 16)]
    assert pred.tile_shape == (16, 16)
    np.testing.assert_array_equal(pred.output, small)


def test_halo_crop_uses_only_trusted_pixels():
    """An engine whose border pixels are garbage: with the halo cropped, none of it reaches the output."""

    class BadBorder(Engine):
        backend = "badborder"

        def __call__(self, batch):
            out = np.array(batch, copy=True)
            out[..., :3, :] = out[..., -3:, :] = out[..., :, :3] = out[..., :, -3:] = 1e6
            return out

    image = np.random.default_rng(2).standard_normal((1, 50, 61)).astype(np.float32)
    pred, _ = _predict(image, (24, 24), halo=(3, 3), engine=BadBorder())
    np.testing.assert_allclose(pred.output, image, rtol=1e-6, atol=1e-6)
    bad, _ = _predict(image, (24, 24), halo=(0, 0), engine=BadBorder())
    assert bad.output.max() > 1e5  # without the halo the garbage shows: the test can fail


def test_grid_matches_monai_sliding_window_positions():
    grid = TileGrid.build((64, 512, 512), (32, 128, 128), overlap=0.25)
    assert grid.starts == ((0, 24, 32), (0, 96, 192, 288, 384), (0, 96, 192, 288, 384))
    assert len(grid) == 75


def test_batches_and_tile_order():
    image = np.arange(2 * 40 * 40, dtype=np.float32).reshape(2, 40, 40)
    one, _ = _predict(image, (16, 16), engine=Offset(), batch_size=1)
    three, _ = _predict(image, (16, 16), engine=Offset(), batch_size=3)
    np.testing.assert_allclose(one.output, image * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(three.output, one.output, rtol=1e-6)


def test_gaussian_weights():
    w = blend_weights((9, 11))
    assert w.shape == (9, 11) and w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[4, 5] == w.max() and w[0, 0] == w.min()
    assert np.all(blend_weights((4, 4), "constant") == 1)
    with pytest.raises(ConfigError, match="unknown mode"):
        blend_weights((4, 4), "median")


def test_invalid_tile_shape_suggests_valid_one():
    assert check_tile_shape([24, 32], [8, 8], [8, 8]) == (24, 32)
    with pytest.raises(ConfigError, match=r"use tiling.tile_shape: \[24, 32\]"):
        check_tile_shape([20, 30], [8, 8], [8, 8], "tiling.tile_shape")
    with pytest.raises(ConfigError, match="2 values but the model is 3D"):
        check_tile_shape([20, 30], [8, 8, 8], [8, 8, 8])
    assert round_up(5, 16, 8) == 16 and round_up(17, 16, 8) == 24


def test_engine_that_changes_the_shape_is_reported():
    class Shrink(Engine):
        backend = "shrink"

        def __call__(self, batch):
            return batch[..., 1:-1, 1:-1]

    with pytest.raises(EfficientBioAIError, match="changes the spatial size"):
        _predict(np.ones((1, 40, 40), np.float32), (16, 16), engine=Shrink())


def test_background_tiles_are_skipped_and_get_the_background_output():
    rng = np.random.default_rng(3)
    image = 0.01 * rng.standard_normal((1, 64, 256)).astype(np.float32)
    image[:, 10:50, 20:60] += 1 + rng.standard_normal((1, 40, 40)).astype(np.float32)  # sample in one corner
    engine = Offset()
    full, _ = _predict(image, (32, 32), engine=engine, overlap=0.0)
    skip, _ = _predict(image, (32, 32), engine=Offset(), overlap=0.0, skip_background=True)
    assert full.skipped == 0 and skip.tiles == full.tiles == 16
    assert skip.skipped == 12  # every tile away from the sample
    sample = (slice(None), slice(0, 64), slice(0, 64))
    np.testing.assert_allclose(skip.output[sample], full.output[sample], rtol=1e-6)
    # skipped tiles hold the engine's mean output on the flattest tile: ≈ 2 × 0 + 1
    np.testing.assert_allclose(skip.output[:, :, 128:], 1.0, atol=0.01)
    # a user threshold above every tile's statistic skips everything; 0 skips nothing
    allbg, _ = _predict(
        image, (32, 32), engine=Offset(), overlap=0.0, skip_background=True, background_threshold=1e9
    )
    assert allbg.skipped == 16
    none, _ = _predict(
        image, (32, 32), engine=Offset(), overlap=0.0, skip_background=True, background_threshold=0
    )
    assert none.skipped == 0


def test_whole_image_preprocessing_and_pointwise_postprocessing():
    pre = [{"id": "zero_mean_unit_variance", "kwargs": {"axes": "cyx"}}]
    post = [{"id": "scale_linear", "kwargs": {"gain": 2.0, "offset": 0.5}}]
    assert split_pointwise(pre) == ([], pre)
    assert split_pointwise(post) == (post, [])
    image = (5 + 3 * np.random.default_rng(4).standard_normal((1, 45, 50))).astype(np.float32)
    pred, _ = _predict(image, (16, 16), pre=pre, post=post)
    expected = (image - image.mean()) / (image.std() + 1e-6) * 2.0 + 0.5
    np.testing.assert_allclose(pred.output, expected, rtol=1e-4, atol=1e-4)


def test_openvino_async_map_keeps_order(tmp_path):
    """The real OpenVINO AsyncInferQueue path returns outputs in submission order."""
    import torch

    from efficientbioai.compress.export import export_onnx

    net = torch.nn.Conv2d(1, 1, 3, padding=1).eval()
    onnx = tmp_path / "m.onnx"
    export_onnx(net, np.zeros((1, 1, 16, 16), np.float32), onnx, "bcyx", 17)
    engine = OpenVINOEngine(onnx, "fp32", 2, hint="THROUGHPUT")
    batches = [np.full((1, 1, 16, 16), i, np.float32) for i in range(12)]
    outs = list(engine.map(iter(batches)))
    assert len(outs) == 12
    for b, o in zip(batches, outs, strict=True):
        np.testing.assert_allclose(o, engine(b), rtol=1e-5, atol=1e-5)
    assert not np.allclose(outs[0], outs[5])


def test_a_pickled_grid_leaves_its_caches_behind():
    """Grids travel to Dask workers inside every task: the cached tiles and weights must not travel along."""
    import pickle

    grid = TileGrid.build((300, 2048, 2048), (16, 128, 128), overlap=0.25)
    small = len(pickle.dumps(grid))
    assert len(grid.tiles) == 11025 and grid.inverse_axis_weights("gaussian")[0].shape == (300,)
    assert len(pickle.dumps(grid)) == small < 2000
    again = pickle.loads(pickle.dumps(grid))
    assert again == grid and again.tiles == grid.tiles


@pytest.mark.parametrize(("shape", "tile"), [((45, 70), (16, 16)), ((21, 33, 40), (8, 12, 16))])
def test_overlap_boxes_bound_exactly_where_run_tiles_overlap(shape, tile):
    """Brute force on a painted coverage map: each skipped tile's box is the bounding box of the pixels of
    its target that a run tile's target covers."""
    grid = TileGrid.build(shape, tile, overlap=0.4)
    run = np.zeros(len(grid), bool)
    run[[1, len(grid) // 2]] = True  # two run tiles: some tiles overlap them, others do not
    boxes = grid.overlap_boxes(run, range(len(grid)))
    covered = np.zeros(shape, bool)
    for t in np.flatnonzero(run):
        covered[grid.tiles[t].target] = True
    checked = 0
    for t in grid.tiles:
        inside = np.zeros(shape, bool)
        inside[t.target] = True
        hits = np.argwhere(inside & covered)
        if not len(hits):
            assert t.index not in boxes
            continue
        want = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(hits.min(0), hits.max(0), strict=True))
        assert boxes[t.index] == want
        checked += 1
    assert 2 < checked < len(grid)


def test_box_difference_covers_the_rest_once():
    outer = (slice(2, 12), slice(0, 9), slice(5, 20))
    inner = (slice(4, 7), slice(0, 9), slice(10, 11))
    count = np.zeros((15, 10, 25), int)
    for part in box_difference(outer, inner):
        count[part] += 1
    want = np.zeros_like(count)
    want[outer] = 1
    want[inner] = 0
    np.testing.assert_array_equal(count, want)
    assert box_difference(outer, outer) == []
