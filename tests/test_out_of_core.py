"""Out-of-core inference: mergers, band blending equal to the in-memory path, chunked outputs on disk,
resuming an interrupted run, bounded memory (measured in a subprocess), lazy calibration sampling."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from efficientbioai.engines import Engine
from efficientbioai.infer.merge import BandMerger, InMemoryMerger, Merger, RegionMerger, choose_slab
from efficientbioai.infer.outofcore import output_layout, predict_to_output, use_out_of_core
from efficientbioai.infer.predict import Predictor
from efficientbioai.io import ChunkedOutput, partial_outputs, read_image
from efficientbioai.processing import apply_steps, fix_statistics, strided_sample
from efficientbioai.sampling import PreparedImage, sample_tiles

from .conftest import REPO


class Nonlinear(Engine):
    """A pointwise but nonlinear network: stitching errors and tile mix-ups show up in the output."""

    backend = "nonlinear"

    def __init__(self, fail_after: int | None = None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, batch):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("interrupted mid-volume")
        return (np.sin(3 * batch) + batch * batch).astype(np.float32)


def _predictor(image, tile, engine=None, **kw):
    return Predictor(
        engine=engine or Nonlinear(),
        axes="bc" + "zyx"[-len(tile) :],
        out_channels=image.shape[0],
        tile_shape=tile,
        **kw,
    )


CASES = [
    ((1, 97, 131), (32, 48), 0.25, "gaussian"),
    ((1, 97, 131), (32, 48), 0.5, "constant"),
    ((2, 33, 65), (16, 16), 0.0, "gaussian"),
    ((1, 5, 7), (16, 16), 0.25, "gaussian"),
    ((1, 37, 45, 38), (8, 16, 16), 0.25, "gaussian"),
    ((1, 19, 45, 38), (8, 16, 16), 0.6, "gaussian"),
    ((2, 3, 17, 9), (8, 16, 16), 0.4, "constant"),
]


@pytest.mark.parametrize(("shape", "tile", "overlap", "blend"), CASES)
@pytest.mark.parametrize("slab", [1, 4, 16])
def test_band_merger_equals_in_memory(shape, tile, overlap, blend, slab):
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    p = _predictor(image, tile, overlap=overlap, blend=blend)
    ref = p(image).output
    got = np.full(shape, np.nan, np.float32)

    def sink(region, data):
        assert np.isnan(got[(slice(None), *region)]).all()  # each slab is written exactly once
        got[(slice(None), *region)] = data

    merger = BandMerger(p.grid(shape[1:]), shape[0], sink, slab, blend)
    assert p(image, merger=merger).output is None
    np.testing.assert_array_equal(got, ref)  # identical to the bit, not only within 1e-5


class BlendEverything(InMemoryMerger):
    """The blending every skipped tile got before fills existed (the base class's fill_constant)."""

    fill_constant = Merger.fill_constant


@pytest.mark.parametrize(("shape", "tile", "overlap", "blend"), [CASES[0], CASES[1], CASES[4]])
def test_skipped_tiles_far_from_run_tiles_hold_the_value_exactly(shape, tile, overlap, blend):
    """Skipped tiles that no run tile overlaps are written with the value after normalising, not blended:
    run-covered pixels are unchanged to the bit, the rest is exactly the value, in every merger."""
    image = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    p = _predictor(image, tile, overlap=overlap, blend=blend)
    plan = p.plan(image)
    grid = plan.grid
    skipped = np.ones(len(grid), bool)
    skipped[len(grid) // 2] = False  # one run tile in the middle, every other tile skipped
    value = np.arange(1, shape[0] + 1, dtype=np.float32) * 0.37
    fill = skipped & ~grid.touching(~skipped)
    assert fill.any() and (skipped & ~fill).any()  # both kinds of skipped tiles occur
    plan.skipped, plan.value, plan.fill = skipped, value, fill
    new = p(image, plan=plan).output
    old = p(image, plan=plan, merger=BlendEverything(grid, shape[0], blend)).output
    covered, filled = np.zeros(shape[1:], bool), np.zeros(shape[1:], bool)
    covered[grid.tiles[len(grid) // 2].target] = True
    for t in np.flatnonzero(fill):
        filled[grid.tiles[t].target] = True
    assert not (covered & filled).any()
    np.testing.assert_array_equal(new[:, covered], old[:, covered])
    values = np.broadcast_to(value.reshape(-1, *[1] * (len(shape) - 1)), shape)
    np.testing.assert_array_equal(new[:, filled], values[:, filled])
    np.testing.assert_allclose(old[:, ~covered], values[:, ~covered], rtol=1e-6)  # blended: up to rounding
    np.testing.assert_allclose(new[:, ~covered], values[:, ~covered], rtol=1e-6)
    got = np.full(shape, np.nan, np.float32)

    def sink(region, data):
        got[(slice(None), *region)] = data

    p(image, plan=plan, merger=BandMerger(grid, shape[0], sink, 4, blend))
    np.testing.assert_array_equal(got, new)


@pytest.mark.parametrize("background", [0.37, 0.0])
def test_band_merger_writes_only_what_differs_from_the_storage_background(background):
    """With ``background`` (the value the storage holds where nothing is written, e.g. a zarr store's fill
    value), a slab is written only inside the chunk-aligned box around what was blended and fills of
    another value; slabs that are all background are not written, but still recorded as done. Read back
    with that background, the output is the in-memory one to the bit."""
    shape, tile = (1, 37, 45, 38), (8, 16, 16)
    image = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    p = _predictor(image, tile, overlap=0.25)
    plan = p.plan(image)
    grid = plan.grid
    middle = len(grid) // 2
    skipped = np.ones(len(grid), bool)
    skipped[middle] = False
    plan.skipped, plan.value = skipped, np.float32([0.37])
    plan.fill = skipped & ~grid.touching(~skipped)
    ref = p(image, plan=plan).output
    got = np.full(shape, background, np.float32)
    written, recorded = [], []

    def sink(region, data):
        written.append(region)
        got[(slice(None), *region)] = data

    merger = BandMerger(grid, 1, sink, 4, background=background, chunks=(8, 8), on_slab=recorded.append)
    p(image, plan=plan, merger=merger)
    np.testing.assert_array_equal(got, ref)
    assert recorded == list(range(merger.n_slabs))  # every slab recorded, written or not
    for region in written:  # whole chunks (or up to the image's edge) along the other axes
        for r, c, n in zip(region[1:], (8, 8), shape[2:], strict=True):
            assert r.start % c == 0 and (r.stop % c == 0 or r.stop == n)
    voxels = sum(int(np.prod([r.stop - r.start for r in region])) for region in written)
    if background == 0.0:  # the fills differ from the storage: every voxel is written
        assert voxels == int(np.prod(shape[1:]))
    else:
        assert {r[0].start // 4 for r in written} < set(range(merger.n_slabs))  # some slabs not written
        assert 0 < voxels < int(np.prod(shape[1:])) / 3


def test_region_merger_gives_the_whole_image_pixels_there():
    image = np.random.default_rng(1).standard_normal((1, 30, 41, 50)).astype(np.float32)
    p = _predictor(image, (8, 16, 16), overlap=0.25)
    ref = p(image).output
    region = (slice(7, 19), slice(13, 41), slice(0, 21))
    merger = RegionMerger(p.grid(image.shape[1:]), 1, region)
    engine = p.engine
    before = engine.calls
    out = p(image, merger=merger).output
    np.testing.assert_array_equal(out, ref[(slice(None), *region)])
    assert engine.calls - before < len(p.grid(image.shape[1:]))  # only the tiles touching the region


def test_in_memory_merger_is_the_default():
    image = np.random.default_rng(2).standard_normal((1, 40, 40)).astype(np.float32)
    p = _predictor(image, (16, 16))
    m = InMemoryMerger(p.grid((40, 40)), 1, "gaussian")
    np.testing.assert_array_equal(p(image, merger=m).output, p(image).output)


def test_background_skipping_works_out_of_core():
    rng = np.random.default_rng(3)
    image = 0.01 * rng.standard_normal((1, 64, 256)).astype(np.float32)
    image[:, 10:50, 20:60] += 1 + rng.standard_normal((1, 40, 40)).astype(np.float32)
    p = _predictor(image, (32, 32), overlap=0.0, skip_background=True)
    ref = p(image)
    got = np.zeros_like(image)

    def sink(region, data):
        got[(slice(None), *region)] = data

    engine = Nonlinear()
    p.engine = engine
    pred = p(image, merger=BandMerger(p.grid((64, 256)), 1, sink, 8))
    assert pred.skipped == ref.skipped == 12 and engine.calls == 1 + 4  # background value + 4 tiles
    np.testing.assert_array_equal(got, ref.output)


def test_statistics_from_a_strided_sample():
    image = (5 + 3 * np.random.default_rng(4).standard_normal((1, 45, 50))).astype(np.float32)
    steps = [{"id": "scale_range", "kwargs": {"min_percentile": 1, "max_percentile": 99.8, "axes": "yx"}}]
    fixed = fix_statistics(steps, image, "bcyx")
    assert fixed[0]["id"] == "zero_mean_unit_variance" and "mean" in fixed[0]["kwargs"]
    # small images are sampled whole: the same result as the whole-image step
    np.testing.assert_allclose(
        apply_steps(image[None], fixed, "bcyx"), apply_steps(image[None], steps, "bcyx"), atol=1e-5
    )
    # large images: a strided sample of bounded size, whose statistics are close
    big = np.random.default_rng(5).gamma(2.0, 100.0, (1, 300, 400)).astype(np.float32)
    sample = strided_sample(big, max_values=10_000)
    assert sample.size <= 10_000 and sample.dtype == np.float32
    fixed = fix_statistics(steps, big, "bcyx", max_values=10_000)
    exact = apply_steps(big[None], steps, "bcyx")
    assert np.abs(apply_steps(big[None], fixed, "bcyx") - exact).max() < 0.05


def test_chunked_output_zarr_and_tiff(tmp_path):
    image = np.random.default_rng(6).standard_normal((1, 37, 45, 38)).astype(np.float32)
    p = _predictor(image, (8, 16, 16))
    ref = p(image).output[0]
    for name in ("vol.zarr", "vol.tif"):
        layout = output_layout((37, 45, 38), "bczyx", 1, 1, p.grid((37, 45, 38)).inner, 45 * 38 * 4 * 20)
        assert layout.slab == 8 and layout.chunks == (8, 45, 38)
        out = ChunkedOutput(tmp_path / name, layout.shape, axes=layout.axes, chunks=layout.chunks)
        predict_to_output(p, [image], out, layout)
        assert not (tmp_path / name).exists() and partial_outputs(tmp_path)  # nothing looks finished yet
        out.commit()
        assert not partial_outputs(tmp_path)
        np.testing.assert_array_equal(np.asarray(read_image(tmp_path / name)), ref)
    import tifffile

    with tifffile.TiffFile(tmp_path / "vol.tif") as tif:
        assert tif.is_bigtiff and len(tif.pages) == 37 and tif.series[0].axes == "ZYX"


def test_tiff_output_with_large_2d_pages_is_tiled(tmp_path, monkeypatch):
    import efficientbioai.io.chunked as chunked

    monkeypatch.setattr(chunked, "_TIFF_TILED_PAGE", 100 * 100)
    image = np.random.default_rng(7).standard_normal((1, 301, 517)).astype(np.float32)
    p = _predictor(image, (64, 64))
    layout = output_layout((301, 517), "bcyx", 1, 1, p.grid((301, 517)).inner, 1 << 20)
    out = ChunkedOutput(tmp_path / "slide.tif", layout.shape, axes=layout.axes, chunks=layout.chunks)
    predict_to_output(p, [image], out, layout)
    out.commit()
    import tifffile

    with tifffile.TiffFile(tmp_path / "slide.tif") as tif:
        assert tif.pages[0].is_tiled
        np.testing.assert_array_equal(tif.asarray(), p(image).output[0])


def test_interrupted_run_leaves_nothing_complete_and_resumes_from_finished_chunks(tmp_path):
    image = np.random.default_rng(8).standard_normal((1, 40, 33, 29)).astype(np.float32)
    full_engine = Nonlinear()
    p = _predictor(image, (8, 16, 16), engine=full_engine)
    ref = p(image).output[0]
    full_calls = full_engine.calls
    layout = output_layout((40, 33, 29), "bczyx", 1, 1, p.grid((40, 33, 29)).inner, 33 * 29 * 4 * 12)
    assert layout.slab == 4
    target = tmp_path / "out" / "vol.zarr"

    p.engine = Nonlinear(fail_after=full_calls // 2)
    out = ChunkedOutput(target, layout.shape, axes=layout.axes, chunks=layout.chunks, fingerprint="run-1")
    with pytest.raises(KeyboardInterrupt):
        predict_to_output(p, [image], out, layout)
    assert not target.exists()  # an interrupted run leaves no output that looks complete
    leftovers = partial_outputs(tmp_path / "out")
    assert len(leftovers) == 1 and 0 < len(out.done(0)) < -(-40 // layout.slab)

    p.engine = rerun = Nonlinear()
    again = ChunkedOutput(target, layout.shape, axes=layout.axes, chunks=layout.chunks, fingerprint="run-1")
    assert again.resumed and again.done(0) == out.done(0)
    predict_to_output(p, [image], again, layout)
    again.commit()
    assert 0 < rerun.calls < full_calls  # the finished slabs were not computed again
    np.testing.assert_array_equal(np.asarray(read_image(target)), ref)
    assert not partial_outputs(tmp_path / "out")

    # another fingerprint (other input or settings) never resumes from a stale store
    p.engine = Nonlinear(fail_after=3)
    stale = ChunkedOutput(
        tmp_path / "x.zarr", layout.shape, axes=layout.axes, chunks=layout.chunks, fingerprint="a"
    )
    with pytest.raises(KeyboardInterrupt):
        predict_to_output(p, [image], stale, layout)
    fresh = ChunkedOutput(
        tmp_path / "x.zarr", layout.shape, axes=layout.axes, chunks=layout.chunks, fingerprint="b"
    )
    assert not fresh.resumed and fresh.done(0) == set()


def test_auto_mode_choice(tmp_path):
    post_whole = [{"id": "scale_range", "kwargs": {}}]
    assert use_out_of_core("auto", tmp_path / "a.zarr", 100, 1, 1 << 20, [], False)
    assert not use_out_of_core("auto", tmp_path / "a.tif", 100, 1, 1 << 20, [], False)
    assert use_out_of_core("auto", tmp_path / "a.tif", 10**7, 1, 1 << 20, [], False)
    assert not use_out_of_core("auto", tmp_path / "a.zarr", 100, 1, 1 << 20, post_whole, False)
    assert not use_out_of_core("false", tmp_path / "a.zarr", 10**9, 1, 1 << 20, [], False)
    from efficientbioai.errors import ConfigError

    with pytest.raises(ConfigError, match="compare_with_original"):
        use_out_of_core("true", tmp_path / "a.tif", 100, 1, 1 << 20, [], True)
    assert choose_slab((300, 2048, 2048), (16, 128, 128), 1, 512 << 20) == 16


_MEMORY_CHILD = textwrap.dedent(
    """
    import json, os, sys, threading
    import numpy as np
    from efficientbioai.engines import Engine
    from efficientbioai.infer.outofcore import output_layout, predict_to_output
    from efficientbioai.infer.predict import Predictor
    from efficientbioai.io import ChunkedOutput, lazy_model_layout, read_image

    class Times2(Engine):
        backend = "x2"
        def __call__(self, batch):
            return batch * 2.0

    src, dst, mode, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    image = lazy_model_layout(read_image(src), "zyx", "bczyx")
    p = Predictor(engine=Times2(), axes="bczyx", out_channels=1, tile_shape=(8, 128, 128),
                  pre=[{"id": "scale_range", "kwargs": {"min_percentile": 1, "max_percentile": 99.8}}])
    p.warm_up(1)
    # one-time set-up of the I/O libraries (zarr's event loop, codec buffers) before the baseline
    np.asarray(image[:, :16, :64, :64])
    warm = ChunkedOutput(dst + ".warm.zarr", (4, 64, 64), chunks=(1, 64, 64))
    warm.array[0:1] = np.ones((1, 64, 64), np.float32)
    warm.discard()
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():  # the current resident set (not the lifetime peak, which imports may have set)
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * page

    base, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if mode == "out_of_core":
        spatial = image.shape[1:]
        layout = output_layout(spatial, "bczyx", 1, 1, p.grid(spatial).inner, budget)
        out = ChunkedOutput(dst, layout.shape, axes=layout.axes, chunks=layout.chunks)
        predict_to_output(p, [image], out, layout)
        out.commit()
    else:
        out = p(image).output
    stop.set()
    sampler.join()
    print(json.dumps({"increase": max(peak[0], rss()) - base}))
    """
)


def test_out_of_core_peak_memory_stays_under_a_budget_4x_smaller_than_the_output(tmp_path):
    """The output (float32) is 4× the budget: out of core stays under the budget, in memory does not.
    The child samples its resident memory every 5 ms (Linux /proc) against the level after setup. The
    budget covers the band (9 planes of 1024 × 1024 here) plus a fixed overhead of the I/O and threading
    libraries (measured 70–120 MiB here, the same for every volume size)."""
    from efficientbioai.io import create_zarr

    budget = 192 << 20
    shape = (192, 1024, 1024)  # float32 output 768 MiB = 4 × budget
    vol = create_zarr(tmp_path / "vol.zarr", shape, np.uint16, "zyx", (16, 128, 128), "vol")
    ramp = (np.arange(1024, dtype=np.uint16)[None, :] + np.arange(1024, dtype=np.uint16)[:, None]) % 4000
    for z in range(0, shape[0], 16):
        vol[z : z + 16] = np.broadcast_to(ramp + np.uint16(z), (16, *shape[1:]))
    assert shape[0] * shape[1] * shape[2] * 4 == 4 * budget

    def run(mode: str) -> int:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _MEMORY_CHILD,
                str(tmp_path / "vol.zarr"),
                str(tmp_path / f"{mode}.zarr"),
                mode,
                str(budget // 4),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["increase"]

    ooc = run("out_of_core")
    assert ooc < budget, f"out of core: peak RSS grew by {ooc / 2**20:.1f} MiB (budget {budget >> 20} MiB)"
    in_memory = run("in_memory")  # the control: the measurement does see a whole-image output
    assert in_memory > 2 * budget, f"in memory grew by only {in_memory / 2**20:.1f} MiB"
    out = read_image(tmp_path / "out_of_core.zarr")
    assert out.shape == shape and float(np.asarray(out[40, 100, 200:210]).std()) > 0


def test_calibration_sampling_reads_tiles_lazily(tmp_path):
    """sample_tiles only slices the images (never loads them whole), and gives the same tiles as before."""
    img = np.zeros((1, 256, 256), np.float32)
    img[:, :64, :64] = np.random.default_rng(0).random((64, 64)) * 10
    img += np.random.default_rng(1).normal(0, 0.01, img.shape).astype(np.float32)

    class Spy:
        def __init__(self, a):
            self.a, self.shape, self.ndim, self.dtype, self.read = a, a.shape, a.ndim, a.dtype, 0

        def __getitem__(self, key):
            out = self.a[key]
            self.read += out.size
            return out

        def __array__(self, *args, **kwargs):
            raise AssertionError("the whole image was loaded")

    spy = Spy(img)
    calib, hold = sample_tiles([spy], (32, 32), 16, 4, seed=0)
    ref_calib, ref_hold = sample_tiles([img], (32, 32), 16, 4, seed=0)
    assert calib.positions == ref_calib.positions and hold.positions == ref_hold.positions
    for a, b in zip(calib.inputs, ref_calib.inputs, strict=True):
        np.testing.assert_array_equal(a, b)
    # a pre-processed lazy image reads tiles and applies the (fixed) steps to what it reads
    steps = fix_statistics([{"id": "zero_mean_unit_variance", "kwargs": {"axes": "yx"}}], img, "bcyx")
    prepared = PreparedImage(img, steps, "bcyx")
    np.testing.assert_allclose(
        prepared[:, 10:20, 5:9], apply_steps(img[None], steps, "bcyx")[0][:, 10:20, 5:9]
    )


def test_fingerprint_changes_with_the_settings_that_change_the_output(tmp_path):
    """A resumed run must not mix chunks computed with other tiling or localisation settings."""
    from efficientbioai.infer.outofcore import fingerprint
    from efficientbioai.localize import SampleLocalizer

    image = np.zeros((1, 8, 32, 32), np.float32)
    src = tmp_path / "in.npy"
    np.save(src, image)
    base = _predictor(image, (8, 16, 16))
    keys = {
        "base": fingerprint(src, tmp_path, base),
        "overlap": fingerprint(src, tmp_path, _predictor(image, (8, 16, 16), overlap=0.5)),
        "localize": fingerprint(src, tmp_path, _predictor(image, (8, 16, 16), localizer=SampleLocalizer())),
        "value": fingerprint(
            src, tmp_path, _predictor(image, (8, 16, 16), localizer=SampleLocalizer(value=0.0))
        ),
    }
    assert len(set(keys.values())) == len(keys)
    assert fingerprint(src, tmp_path, _predictor(image, (8, 16, 16))) == keys["base"]
