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
