"""Sample localisation: regions on generated sparse images, bounded reads, exact output inside the sample."""

from __future__ import annotations

import numpy as np
import pytest

from efficientbioai.config import InferConfig, validate_config
from efficientbioai.engines import Engine, OpenVINOEngine
from efficientbioai.errors import ConfigError
from efficientbioai.infer.predict import Predictor, sample_localizer
from efficientbioai.localize import (
    SampleLocalizer,
    auto_factor,
    downsample,
    localize,
    uncovered_fraction,
)
from efficientbioai.tiling import TileGrid


def sparse(shape, box, seed=0):
    """Noisy dark background with a textured bright sample filling ``box`` (a tuple of slices)."""
    rng = np.random.default_rng(seed)
    img = (0.1 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    img[box] += 0.6 + 0.3 * rng.random(img[box].shape).astype(np.float32)
    return img


class Reads:
    """A lazily read array (like a zarr array) that records how many elements each read returned."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.chunks = getattr(array, "chunks", None)
        self.sizes: list[int] = []
        self.keys: list = []

    def __getitem__(self, key):
        out = self.array[key]
        self.sizes.append(out.size)
        self.keys.append(key)
        return out


class Blur(Engine):
    """A context-dependent engine: a 3-voxel box mean along every spatial axis (edges repeat), plus 1.
    Its output near a tile's border depends on the tile, as a network's does."""

    backend = "blur"

    def __init__(self):
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        out = batch.astype(np.float32)
        for axis in range(2, batch.ndim):
            p = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(out.ndim)], mode="edge")
            n = out.shape[axis]
            out = (
                p.take(range(0, n), axis) + p.take(range(1, n + 1), axis) + p.take(range(2, n + 2), axis)
            ) / 3
        return out + 1.0


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((300, 420), (slice(40, 130), slice(250, 400))),
        ((48, 160, 200), (slice(8, 30), slice(20, 70), slice(120, 190))),
    ],
)
def test_regions_found_on_sparse_images(shape, box):
    img = sparse(shape, box)
    loc = localize(img, has_channels=False, margin=0)
    assert loc.found and len(loc.regions) == 1
    (region,) = loc.regions
    for r, b, f in zip(region, box, loc.factor, strict=True):  # within one low-resolution voxel
        assert b.start - f <= r.start <= b.start and b.stop <= r.stop <= b.stop + f
    truth = 1 - np.prod([b.stop - b.start for b in box]) / np.prod(shape)
    assert abs(loc.fraction_outside - truth) < 0.03
    # a margin grows the region, clipped at the image border
    grown = localize(img[np.newaxis], margin=8).regions[0]
    for g, r, n in zip(grown, region, shape, strict=True):
        assert g.start == max(r.start - 8, 0) or g.start < r.start
        assert min(r.stop + 8, n) <= g.stop <= n


def test_two_samples_min_size_and_nothing_found():
    img = sparse((64, 256, 256), (slice(10, 50), slice(20, 100), slice(20, 100)))
    img[20:40, 150:230, 150:230] += 0.8  # a second sample
    img[5:7, 200:203, 20:23] += 3.0  # a bright speck (dust)
    loc = localize(img, has_channels=False, downsample_factor=2, sigma=0.5)
    assert len(loc.regions) == 3
    big = localize(img, has_channels=False, downsample_factor=2, sigma=0.5, min_size=1000)
    assert len(big.regions) == 2 and big.fraction_outside > loc.fraction_outside
    flat = localize(np.full((1, 32, 64, 64), 7.0, np.float32))
    assert not flat.found and flat.mask.all() and flat.fraction_outside == 0.0


def test_downsample_is_block_mean_read_slab_by_slab():
    rng = np.random.default_rng(1)
    img = rng.random((2, 21, 50, 37)).astype(np.float32)
    lazy = Reads(img)
    low = downsample(lazy, (4, 6, 5), read_bytes=8 * 50 * 37 * 4)
    expected = np.zeros(low.shape)
    for i, j, k in np.ndindex(low.shape):
        expected[i, j, k] = img[:, 4 * i : 4 * i + 4, 6 * j : 6 * j + 6, 5 * k : 5 * k + 5].mean()
    np.testing.assert_allclose(low, expected, rtol=1e-5)
    assert max(lazy.sizes) <= 8 * 50 * 37  # never more than the read budget at once
    assert sum(lazy.sizes) == img.size  # every voxel read once
    # auto: at most max_voxels voxels at low resolution
    f = auto_factor((300, 2048, 2048))
    assert np.prod([-(-n // x) for n, x in zip((300, 2048, 2048), f, strict=True)]) <= 2**21
    assert auto_factor((64, 64)) == (1, 1)


def test_localize_reads_zarr_lazily(tmp_path):
    import zarr

    img = sparse((40, 128, 160), (slice(5, 20), slice(10, 60), slice(90, 150)))
    arr = zarr.open_array(str(tmp_path / "v.zarr"), mode="w", shape=img.shape, chunks=(8, 64, 64), dtype="f4")
    arr[:] = img
    lazy = Reads(arr)
    loc = localize(lazy, has_channels=False, downsample_factor=2, margin=0)
    assert max(lazy.sizes) < img.size / 4
    # reads are aligned to the chunks (8 planes, 64 rows): no chunk is decompressed twice
    assert sum(lazy.sizes) == img.size
    assert all(k[0].start % 8 == 0 and k[0].stop % 8 == 0 and k[1].start % 64 == 0 for k in lazy.keys)
    np.testing.assert_array_equal(loc.mask, localize(img, has_channels=False, downsample_factor=2).mask)


def test_uncovered_fraction_is_exact():
    grid = TileGrid.build((50, 70), (16, 16), overlap=0.25)
    tiles = list(grid)
    assert uncovered_fraction(grid, tiles) == 0.0 and uncovered_fraction(grid, []) == 1.0
    some = tiles[::3]
    covered = np.zeros((50, 70), bool)
    for t in some:
        covered[t.target] = True
    assert uncovered_fraction(grid, some) == pytest.approx(1 - covered.mean())


@pytest.mark.parametrize(
    ("shape", "tile", "box"),
    [
        ((1, 200, 260), (32, 32), (slice(None), slice(30, 90), slice(150, 230))),
        ((1, 40, 120, 150), (16, 32, 32), (slice(None), slice(4, 24), slice(10, 50), slice(90, 140))),
    ],
)
def test_output_inside_sample_is_identical_and_skipped_fraction_reported(shape, tile, box):
    img = sparse(shape, box, seed=2)
    kw = {"axes": "bc" + "zyx"[-len(tile) :], "out_channels": 1, "tile_shape": tile, "overlap": 0.25}
    full = Predictor(engine=Blur(), **kw)(img)
    engine = Blur()
    local = Predictor(engine=engine, localizer=SampleLocalizer(), **kw)(img)
    loc = local.localization
    assert loc.found and local.skipped > local.tiles / 2
    assert engine.calls == local.tiles - local.skipped + 1  # + the background-value tile
    inside = np.kron(loc.mask, np.ones(loc.factor, bool))[tuple(slice(0, n) for n in shape[1:])]
    assert inside[box[1:]].all()
    np.testing.assert_array_equal(local.output[0][inside], full.output[0][inside])  # bit for bit
    covered = np.zeros(shape[1:], bool)  # by the inner regions of the tiles that ran
    for t in Predictor(engine=engine, **kw).grid(shape[1:]):
        if loc.touches(t.target):
            covered[t.target] = True
    assert local.skipped_fraction == pytest.approx(1 - covered.mean())
    assert 0.3 < local.skipped_fraction <= loc.fraction_outside
    # no tile covers these: the engine's mean output on the flattest background tile, ≈ 0.1 + 1
    np.testing.assert_allclose(local.output[0][~covered], 1.1, atol=0.01)
    assert full.skipped == 0 and full.skipped_fraction == 0.0
    # a constant background value instead of the engine's
    const = Predictor(engine=Blur(), localizer=SampleLocalizer(value=-5.0), **kw)(img)
    np.testing.assert_array_equal(const.output[0][inside], full.output[0][inside])
    assert const.output.min() == pytest.approx(-5.0)


def test_real_openvino_engine_3d_exact_inside_sample(tmp_path):
    """The same with a real OpenVINO engine (a tiny 3D U-Net, THROUGHPUT hint: several requests in flight)."""
    from efficientbioai.compress.export import export_onnx

    from .conftest import tiny_unet

    onnx = tmp_path / "unet3d.onnx"
    export_onnx(tiny_unet(3), np.zeros((1, 1, 16, 32, 32), np.float32), onnx, "bczyx", 17)
    engine = OpenVINOEngine(onnx, "fp32", 2, hint="THROUGHPUT")
    img = sparse((1, 32, 96, 128), (slice(None), slice(6, 26), slice(8, 40), slice(80, 120)), seed=5)
    kw = {"axes": "bczyx", "out_channels": 1, "tile_shape": (16, 32, 32), "overlap": 0.25, "batch_size": 2}
    full = Predictor(engine=engine, **kw)(img)
    local = Predictor(engine=engine, localizer=SampleLocalizer(region="box"), **kw)(img)
    engine.close()
    loc = local.localization
    inside = np.zeros(img.shape[1:], bool)
    for r in loc.regions:
        inside[r] = True
    assert local.skipped > 0 and inside.mean() < 0.5
    np.testing.assert_array_equal(local.output[0][inside], full.output[0][inside])


@pytest.mark.parametrize(
    ("localize", "message"),
    [
        ({"enabled": True, "downsample": 0}, "localize.downsample: values must be at least 1"),
        ({"enabled": True, "margin": -2}, "localize.margin: values must be at least 0"),
        ({"enabled": True, "margin": [1, 2, 3, 4]}, "one per spatial axis"),
        ({"enabled": True, "region": "boxes"}, "localize.region"),
        ({"enable": True}, "did you mean 'enabled'"),
        ({"enabled": True, "sigma": -1}, "localize.sigma"),
    ],
)
def test_bad_localize_options_are_named(tmp_path, localize, message):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.yaml").write_text("{}")
    raw = {"model": str(tmp_path / "art"), "input": "x.tif", "output": "o", "tiling": {"localize": localize}}
    with pytest.raises(ConfigError, match=message):
        validate_config(raw, InferConfig)


def test_per_axis_option_of_the_wrong_length_is_named_at_run_time():
    localizer = SampleLocalizer(downsample=[2, 2])
    with pytest.raises(
        ConfigError, match=r"tiling.localize.downsample: \[2, 2\] has 2 values for a 3D image"
    ):
        localizer.locate(np.zeros((1, 8, 16, 16), np.float32))
    assert sample_localizer(InferConfig.model_fields["tiling"].default_factory().localize) is None


def test_otsu_matches_scikit_image():
    from skimage.filters import threshold_otsu as reference

    from efficientbioai.localize import threshold_otsu

    rng = np.random.default_rng(0)
    for k in range(4):
        x = np.concatenate([rng.normal(0.1, 0.02, 4000 * (k + 1)), rng.normal(0.6 + 0.1 * k, 0.1, 3000)])
        assert threshold_otsu(x) == pytest.approx(float(reference(x)), rel=1e-6)


def test_out_of_core_output_leaves_background_chunks_unwritten(tmp_path):
    """Out of core, a localised prediction's zarr store takes the background value as its fill value, so
    chunks that hold only that value are never compressed nor written; read back, the output equals the
    in-memory one to the bit."""
    import zarr

    from efficientbioai.infer.outofcore import output_layout, predict_to_output
    from efficientbioai.io import ChunkedOutput

    shape = (1, 40, 160, 200)
    img = sparse(shape, (slice(None), slice(5, 35), slice(20, 70), slice(120, 190)), seed=4)
    kw = {"axes": "bczyx", "out_channels": 1, "tile_shape": (16, 32, 32), "overlap": 0.25}
    predictor = Predictor(engine=Blur(), localizer=SampleLocalizer(), **kw)
    ref = predictor(img)
    layout = output_layout(shape[1:], "bczyx", 1, 1, predictor.grid(shape[1:]).inner, 2**20)
    out = ChunkedOutput(tmp_path / "pred.zarr", layout.shape, axes=layout.axes, chunks=(8, 32, 32))
    (pred,) = predict_to_output(predictor, [img], out, layout)
    assert pred.seconds > 0 and pred.skipped == ref.skipped
    array = out.array
    assert array.fill_value == ref.output[0][0, 0, 0]  # a background voxel: the skipped tiles' value
    chunks = sum(1 for f in out.store.joinpath("0").rglob("*") if f.is_file() and not f.name.startswith("."))
    total = int(np.prod([-(-n // c) for n, c in zip(array.shape, array.chunks, strict=True)]))
    assert 0 < chunks < total / 2  # the sample's chunks only
    out.commit()
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "pred.zarr", path="0")[:], ref.output[0])


class FailingBlur(Blur):
    """:class:`Blur` that is interrupted after ``fail_after`` calls."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.fail_after = fail_after

    def __call__(self, batch):
        if self.calls >= self.fail_after:
            raise KeyboardInterrupt("interrupted mid-volume")
        return super().__call__(batch)


def test_localised_out_of_core_run_resumes_to_the_same_output(tmp_path):
    """Out of core, slabs are written only around the sample (the rest is the store's fill value); an
    interrupted localised run leaves nothing that looks complete, and the rerun resumes from its finished
    slabs to exactly the uninterrupted (in-memory) result."""
    from efficientbioai.infer.outofcore import output_layout, predict_to_output
    from efficientbioai.io import ChunkedOutput, partial_outputs, read_image

    shape = (1, 48, 192, 240)
    img = sparse(shape, (slice(None), slice(8, 40), slice(30, 70), slice(60, 110)), seed=6)
    kw = {"axes": "bczyx", "out_channels": 1, "tile_shape": (8, 32, 32), "overlap": 0.25}
    ref = Predictor(engine=Blur(), localizer=SampleLocalizer(), **kw)(img)
    assert 0 < ref.skipped < ref.tiles
    predictor = Predictor(engine=FailingBlur(fail_after=ref.computed // 2), localizer=SampleLocalizer(), **kw)
    layout = output_layout(shape[1:], "bczyx", 1, 1, predictor.grid(shape[1:]).inner, 192 * 240 * 4 * 16)
    assert layout.slab == 8
    target = tmp_path / "out" / "pred.zarr"
    out = ChunkedOutput(target, layout.shape, axes=layout.axes, chunks=(8, 32, 32), fingerprint="loc")
    with pytest.raises(KeyboardInterrupt):
        predict_to_output(predictor, [img], out, layout)
    assert not target.exists() and len(partial_outputs(tmp_path / "out")) == 1
    assert 0 < len(out.done(0)) < 48 // 8

    predictor.engine = rerun = Blur()
    again = ChunkedOutput(target, layout.shape, axes=layout.axes, chunks=(8, 32, 32), fingerprint="loc")
    assert again.resumed
    predict_to_output(predictor, [img], again, layout)
    written = [f for f in again.store.joinpath("0").rglob("*") if f.is_file() and not f.name.startswith(".")]
    assert 0 < len(written) < 6 * 6 * 8 / 3  # chunks of 8 x 32 x 32: around the sample only
    again.commit()
    assert 0 < rerun.calls < ref.computed + 1  # finished slabs were not computed again

    np.testing.assert_array_equal(np.asarray(read_image(target)), ref.output[0])
