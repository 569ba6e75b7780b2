"""The read cache of decoded zarr chunks: same data as the array, each chunk decoded once per reuse, bounded."""

from __future__ import annotations

import numpy as np
import pytest

from efficientbioai.infer.predict import Predictor
from efficientbioai.io import ChunkCache, cached, create_zarr, lazy_model_layout


@pytest.fixture
def stored(tmp_path):
    data = np.random.default_rng(0).integers(0, 60000, (21, 70, 90)).astype(np.uint16)
    array = create_zarr(tmp_path / "v.zarr", data.shape, data.dtype, "zyx", (8, 16, 32), "v")
    array[:] = data
    return data, array


def test_reads_equal_the_array(stored):
    data, array = stored
    view = ChunkCache(array, 2**20)
    rng = np.random.default_rng(1)
    for _ in range(200):
        lo = [int(rng.integers(0, n)) for n in data.shape]
        key = tuple(slice(a, int(rng.integers(a, n + 1))) for a, n in zip(lo, data.shape, strict=True))
        np.testing.assert_array_equal(view[key], data[key])
    for key in [(3, slice(5, 60), slice(None)), (-1, 0), (slice(None, None, 2),), (..., 4), (slice(18, 40),)]:
        got = view[key]
        np.testing.assert_array_equal(got, data[key])
        assert got.shape == data[key].shape
    with pytest.raises(IndexError):
        view[21]
    assert view.shape == data.shape and view.dtype == data.dtype and view.chunks == (8, 16, 32)


def test_overlapping_tiles_decode_each_chunk_once(stored):
    """A row of tiles that overlap by a quarter and straddle chunk edges: without the cache each tile
    decodes every chunk it touches; with it each chunk is decoded once."""
    data, array = stored
    view = ChunkCache(array, 2**20)
    touched = 0
    for y in range(0, 70 - 24 + 1, 18):
        for x in range(0, 90 - 24 + 1, 18):
            key = (slice(2, 14), slice(y, y + 24), slice(x, x + 24))
            np.testing.assert_array_equal(view[key], data[key])
            touched += 2 * len(range(y // 16, -(-(y + 24) // 16))) * len(range(x // 32, -(-(x + 24) // 32)))
    assert view.decoded == 2 * 4 * 3  # the chunks under the tiles (z 2..14, y 0..60, x 0..78)
    assert touched > 2 * view.decoded


def test_the_budget_bounds_memory_and_large_reads_bypass(stored):
    data, array = stored
    chunk = 8 * 16 * 32 * 2
    view = ChunkCache(array, 5 * chunk)
    for y in (0, 16):
        for x in (0, 32, 64):
            view[0:8, y : y + 16, x : x + 20]  # one chunk each
    assert view.decoded == 6 and len(view._cache) == 5 and view._bytes <= 5 * chunk  # the oldest went
    assert (0, 0, 0) not in view._cache and (0, 1, 2) in view._cache
    before = view.decoded
    np.testing.assert_array_equal(view[:, :, :], data)  # 36 chunks > a quarter of the budget: bypassed
    assert view.decoded == before


def test_predictions_through_the_cache_are_identical(stored):
    """The sliding window over a cached zarr volume gives the output of the plain zarr array, to the bit."""
    from .test_localize import Blur

    _, array = stored
    kw = {"axes": "bczyx", "out_channels": 1, "tile_shape": (8, 24, 24), "overlap": 0.25}
    plain = Predictor(engine=Blur(), **kw)(lazy_model_layout(array, "zyx", "bczyx"))
    view = cached(array, 2**22)
    assert isinstance(view, ChunkCache) and cached(np.zeros(3), 2**22).__class__ is np.ndarray
    assert cached(array, 0) is array
    through = Predictor(engine=Blur(), **kw)(lazy_model_layout(view, "zyx", "bczyx"))
    np.testing.assert_array_equal(through.output, plain.output)
    assert view.decoded == 3 * 5 * 3  # every chunk once


def test_the_localisation_pass_reads_around_the_cache(stored):
    """The sample-localisation pass reads the whole image once: through a lazy view it bypasses the cache
    (nothing decoded into it, nothing pushed out), gives the same low-resolution copy, and the cache
    serves tiles again afterwards."""
    from efficientbioai.io import bypassing
    from efficientbioai.localize import downsample

    data, array = stored
    view = ChunkCache(array, 2**22)  # holds the whole volume: without the bypass the pass would fill it
    layout = lazy_model_layout(view, "zyx", "bczyx")
    np.testing.assert_array_equal(view[0:8, 0:16, 0:32], data[0:8, 0:16, 0:32])
    assert view.decoded == 1
    low = downsample(layout, (2, 4, 4), read_bytes=8 * 16 * 90 * 4)  # several reads, each through the view
    np.testing.assert_array_equal(low, downsample(data[np.newaxis], (2, 4, 4)))
    assert view.decoded == 1 and list(view._cache) == [(0, 0, 0)] and not view.bypass
    with bypassing(np.zeros(3)):  # nothing to bypass: a no-op
        pass
    view[0:8, 16:32, 0:32]
    assert view.decoded == 2


def test_worst_case_chunks_under_a_read():
    from efficientbioai.io.cache import chunk_bytes_under

    # whole planes: a 16-plane tile reads 16 of them, wherever it sits
    assert chunk_bytes_under((1, 2048, 2048), (300, 2048, 2048), 4, (16, 128, 128)) == 16 * 2048 * 2048 * 4
    # a tile smaller than a chunk can straddle two along each axis; never more chunks than the axis has
    assert chunk_bytes_under((64, 64, 64), (64, 1000, 1000), 2, (32, 64, 64)) == 1 * 2 * 2 * 64**3 * 2
    assert chunk_bytes_under((8, 16, 32), (21, 70, 90), 1, (9, 17, 33)) == 2 * 2 * 2 * 8 * 16 * 32
    assert chunk_bytes_under((8, 16, 32), (21, 70, 90), 1, (9, 18, 34)) == 2 * 3 * 3 * 8 * 16 * 32
    assert chunk_bytes_under((8, 16, 32), (21, 70, 90), 1, (100, 1, 0)) == 3 * 1 * 1 * 8 * 16 * 32


def test_large_chunks_grow_the_cache_so_tiles_decode_each_chunk_about_once(tmp_path):
    """Whole-plane chunks: with the configured budget too small for the chunks under one tile, every tile
    would bypass the cache and decode all its planes again. ``open_samples`` grows the budget to twice
    that (and says so); each plane is then decoded about once per layer of tiles, and the prediction
    is the same to the bit."""
    from efficientbioai.artifact import InputSpec
    from efficientbioai.infer.images import cache_note, open_samples

    from .test_localize import Blur

    data = np.random.default_rng(2).integers(0, 60000, (20, 96, 112)).astype(np.uint16)
    path = tmp_path / "planes.zarr"
    create_zarr(path, data.shape, data.dtype, "zyx", (1, 96, 112), "planes")[:] = data
    plane = 96 * 112 * 2
    spec = InputSpec(axes="bczyx", channels=1)
    kw = {"axes": "bczyx", "out_channels": 1, "tile_shape": (8, 32, 32), "overlap": 0.25}
    plain = Predictor(engine=Blur(), **kw)(np.asarray(data, np.float32)[np.newaxis])

    raw, _, images = open_samples(path, "zyx", spec, 4 * plane)  # no tile shape: the budget stays
    assert isinstance(raw, ChunkCache) and raw.max_bytes == 4 * plane and cache_note(raw) is None
    out = Predictor(engine=Blur(), **kw)(images[0])
    np.testing.assert_array_equal(out.output, plain.output)
    assert raw.decoded == 0  # tiles of 8 planes bypass a 4-plane cache: each decodes its planes again

    raw, _, images = open_samples(path, "zyx", spec, 4 * plane, tile_shape=(8, 32, 32))
    assert raw.max_bytes == 2 * 8 * plane and raw.grown_from == 4 * plane
    note = cache_note(raw)
    assert "(1, 96, 112)" in note and "grew from" in note and "read_cache_mb" in note
    out = Predictor(engine=Blur(), **kw)(images[0])
    np.testing.assert_array_equal(out.output, plain.output)
    layers = len(range(0, 20 - 8 + 1, 6)) + 1  # tile layers along z (step 6, one more at the end)
    assert raw.decoded <= layers * 8  # each layer's planes once, not once per tile


def test_a_lazy_view_names_what_a_tile_reads_of_its_array(tmp_path):
    """The read shape per axis of the stored array: the tile on the spatial axes, every channel, one
    index of a dropped size-1 axis (what the cache's budget is fitted to)."""
    five = create_zarr(tmp_path / "a.zarr", (1, 3, 20, 30, 40), np.uint16, "tczyx", (1, 1, 8, 8, 8), "a")
    assert lazy_model_layout(five, "tczyx", "bczyx").array_read_shape((8, 16, 16)) == (1, 3, 8, 16, 16)
    three = create_zarr(tmp_path / "b.zarr", (20, 30, 40), np.uint16, "zyx", (8, 8, 8), "b")
    assert lazy_model_layout(three, "zyx", "bczyx").array_read_shape((8, 16, 16)) == (8, 16, 16)
