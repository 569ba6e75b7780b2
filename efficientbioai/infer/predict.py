"""Predict one whole image with an engine: lazy tiles → engine (pipelined) → blended output.

Pre-processing steps that need whole-image statistics (per-sample normalisation, percentile scaling) get
their statistics once per image from a strided sample and are then applied per tile like the point-wise
steps (fixed normalisation, scaling, clipping), so a memory-mapped TIFF or a zarr volume is only ever read
a tile at a time. Where the blended output goes is a :class:`~efficientbioai.infer.merge.Merger`'s
business: the whole image in memory, or a band flushed to disk chunk by chunk (out of core).
Post-processing is applied per tile when it is point-wise (e.g. a sigmoid) and to the stitched output
otherwise.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from efficientbioai.engines import Engine
from efficientbioai.errors import EfficientBioAIError
from efficientbioai.infer.merge import InMemoryMerger, Merger
from efficientbioai.localize import SampleLocalizer, uncovered_fraction
from efficientbioai.nonfinite import Filled
from efficientbioai.packing import alignment
from efficientbioai.processing import apply_steps, fix_statistics
from efficientbioai.tiling import (
    Tile,
    TileGrid,
    box_difference,
    check_tile_shape,
    estimate_background_threshold,
    tile_statistic,
)

if TYPE_CHECKING:
    from efficientbioai.artifact import Manifest
    from efficientbioai.config import LocalizeConfig, TilingConfig

POINTWISE = {"scale_linear", "clip", "sigmoid", "binarize", "ensure_dtype", "fixed_zero_mean_unit_variance"}


def is_pointwise(step: dict[str, Any]) -> bool:
    """Whether a processing step acts on each pixel alone (no image statistics)."""
    kw = step.get("kwargs", {})
    if step["id"] == "zero_mean_unit_variance":
        return kw.get("mode") == "fixed" or (kw.get("mean") is not None and kw.get("std") is not None)
    return step["id"] in POINTWISE


def split_pointwise(steps: Sequence[dict[str, Any]]) -> tuple[list, list]:
    """(leading point-wise steps, the rest)."""
    steps = list(steps)
    n = 0
    while n < len(steps) and is_pointwise(steps[n]):
        n += 1
    return steps[:n], steps[n:]


@dataclass
class Prediction:
    output: np.ndarray | None  # (C_out, *spatial) float32; None when a merger wrote it elsewhere
    seconds: float
    tiles: int
    skipped: int = 0
    background_threshold: float | None = None
    tile_shape: tuple[int, ...] = ()
    computed: int = 0  # tiles sent to the engine in this call (fewer when a run resumes)
    visited: int = 0  # tiles run or given the background value in this call (all but a resumed run's)
    skipped_fraction: float = 0.0  # of the voxels, covered by no run tile (they hold the background value)
    localization: Any = None  # efficientbioai.localize.Localization when sample localisation ran


@dataclass
class Plan:
    """What every tile of one image needs (see :meth:`Predictor.plan`)."""

    grid: TileGrid
    pre: list[dict[str, Any]]  # point-wise pre-processing, statistics fixed
    skipped: np.ndarray  # bool per grid tile: gets ``value`` instead of an engine call
    threshold: float | None = None
    value: np.ndarray | None = None
    skipped_fraction: float = 0.0  # of the voxels, covered by no run tile
    localization: Any = None  # efficientbioai.localize.Localization when sample localisation ran
    fill: np.ndarray | None = None  # bool per grid tile: skipped and overlapping no run tile


@dataclass
class Predictor:
    """Sliding-window prediction of (C, *spatial) images with one engine.

    ``axes`` are the network's axes (``bcyx`` / ``bczyx``); ``pre`` / ``post`` the model's processing
    steps; ``tile_min`` / ``tile_step`` / ``halo`` describe which tiles the network accepts (from the
    artifact's manifest).
    """

    engine: Engine
    axes: str
    out_channels: int
    tile_shape: Sequence[int]
    tile_min: Sequence[int] | None = None
    tile_step: Sequence[int] | None = None
    halo: Sequence[int] | None = None
    pre: Sequence[dict[str, Any]] = ()
    post: Sequence[dict[str, Any]] = ()
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int = 1
    skip_background: bool = False
    background_threshold: float | None = None
    localizer: Any = None  # efficientbioai.localize.SampleLocalizer: skip the tiles outside the sample
    align: Sequence[int] | None = None  # tiles start on multiples of it (outputs at 1/k of the scale)

    @classmethod
    def from_artifact(
        cls, manifest: Manifest, engine: Engine, tiling: TilingConfig | None = None
    ) -> Predictor:
        """The predictor ``infer`` uses for an artifact's ``engine`` with the ``tiling:`` settings.

        ``manifest`` (:class:`~efficientbioai.artifact.Manifest`, e.g. ``Artifact(dir).manifest``)
        gives the network's axes, channels, valid tiles, halo and processing steps; ``tiling`` (default:
        the defaults of ``infer``'s ``tiling:`` section) the tile shape (default: the calibration tile),
        overlap, blending, batch size, background skipping and sample localisation.
        """
        from efficientbioai.config import TilingConfig

        tiling = tiling or TilingConfig()
        inp = manifest.input
        ones = [1] * inp.ndim
        tile = check_tile_shape(
            tiling.tile_shape or manifest.calibration.tile_shape,
            inp.tile_min or ones,
            inp.tile_step or ones,
            "tiling.tile_shape",
        )
        return cls(
            engine=engine,
            axes=inp.axes,
            out_channels=manifest.output.channels,
            tile_shape=tile,
            tile_min=inp.tile_min,
            tile_step=inp.tile_step,
            halo=inp.halo,
            pre=inp.preprocessing,
            post=manifest.output.postprocessing,
            overlap=tiling.overlap,
            blend=tiling.blend,
            batch_size=tiling.batch_size,
            skip_background=tiling.background.skip,
            background_threshold=tiling.background.threshold,
            localizer=sample_localizer(tiling.localize),
            align=alignment(manifest.output.outputs, inp.ndim) if manifest.output.packed else None,
        )

    def grid(self, spatial_shape: Sequence[int]) -> TileGrid:
        return TileGrid.build(
            spatial_shape,
            self.tile_shape,
            overlap=self.overlap,
            halo=self.halo,
            tile_min=self.tile_min,
            tile_step=self.tile_step,
            align=self.align,
        )

    def warm_up(self, channels: int) -> None:
        """One untimed engine call at the tile shape (first-call allocations and kernel selection)."""
        self.engine(np.zeros((self.batch_size, channels, *self.tile_shape), np.float32))

    def prepare(self, image) -> list[dict[str, Any]]:
        """The pre-processing steps for ``image`` as point-wise steps, applied tile by tile: per-image
        statistics (per-sample normalisation, percentiles) are measured once on a strided sample
        (:func:`~efficientbioai.processing.fix_statistics`), never on a float copy of the whole image."""
        return fix_statistics(self.pre, image, self.axes)

    def skip_flags(self, image, grid: TileGrid, tiles: Sequence[Tile]) -> tuple[list[bool], float | None]:
        """Which tiles get the constant background value instead of an engine call, and the threshold.

        Tiles flagged here are never sent to the engine; every merger adds them with
        :meth:`background_value`. The flags depend only on the image and the grid, so every path
        (in memory, out of core, Dask blocks) skips the same tiles.
        """
        if not self.skip_background:
            return [False] * len(tiles), None
        stats = [_cheap_statistic(image, t) for t in tiles]
        threshold = self.background_threshold
        if threshold is None:
            threshold = estimate_background_threshold(stats)
        return [s < threshold for s in stats], threshold

    def background_value(
        self, image, grid: TileGrid, tiles: Sequence[Tile], skipped, pre_tile, flattest: Tile | None = None
    ) -> np.ndarray:
        """The engine's mean output (per channel) on the flattest skipped tile (or on ``flattest``)."""
        if flattest is None:
            candidates = [t for t, s in zip(tiles, skipped, strict=True) if s]
            flattest = min(candidates, key=lambda t: _cheap_statistic(image, t))
        x = grid.read(image, flattest)[np.newaxis]
        if pre_tile:
            x = apply_steps(x, pre_tile, self.axes)
        out = self.engine(x)
        post_tile, _ = split_pointwise(self.post)
        if post_tile:
            out = apply_steps(out, post_tile, self.axes)
        inner = out[(0, slice(None), *flattest.crop)]
        return inner.reshape(inner.shape[0], -1).mean(axis=1)

    def plan(self, image) -> Plan:
        """Everything about ``image`` that every tile needs: grid, point-wise pre-processing, skipped
        tiles and their value. Small; computed once per image (also for Dask, then sent to the workers)."""
        grid = self.grid(tuple(image.shape[1:]))
        tiles = list(grid)
        pre_tile = self.prepare(image)
        skipped, threshold = self.skip_flags(image, grid, tiles)
        selection = None
        if self.localizer is not None:  # tiles outside the sample join the skipped ones
            candidates = [t for t, s in zip(tiles, skipped, strict=True) if not s]
            selection = self.localizer.select(image, grid, candidates, halo=self.halo)
            outside = {id(t) for t in selection.outside}
            skipped = [s or id(t) in outside for t, s in zip(tiles, skipped, strict=True)]
        if isinstance(image, Filled) and any(skipped):  # filled voxels are run, so that they are marked
            mask = image.mask
            skipped = [
                s and not np.asarray(mask[(slice(None), *t.target)]).any()
                for t, s in zip(tiles, skipped, strict=True)
            ]
        value = None
        if any(skipped):
            if self.localizer is not None and self.localizer.value is not None:
                value = np.full(self.out_channels, self.localizer.value, np.float32)
            else:
                flattest = selection.background_tile if selection is not None else None
                value = self.background_value(image, grid, tiles, skipped, pre_tile, flattest)
        run = [t for t, s in zip(tiles, skipped, strict=True) if not s]
        skipped = np.asarray(skipped, bool)
        # skipped tiles that no run tile overlaps hold the value exactly: written, not blended
        fill = skipped & ~grid.touching(~skipped) if skipped.any() else None
        return Plan(
            grid,
            pre_tile,
            skipped,
            threshold,
            value,
            skipped_fraction=uncovered_fraction(grid, run) if skipped.any() else 0.0,
            localization=selection.localization if selection is not None else None,
            fill=fill,
        )

    def __call__(
        self, image, progress: Any = None, *, merger: Merger | None = None, plan: Plan | None = None
    ):
        """Predict the (C, *spatial) ``image``; the result goes to ``merger`` (default: in memory).

        Tiles are visited in grid order; tiles the merger no longer needs (finished regions of a resumed
        run, tiles outside a Dask block) are neither read nor run.
        """
        t0 = time.perf_counter()
        plan = plan or self.plan(image)
        grid = plan.grid
        post_tile, post_whole = split_pointwise(self.post)
        if merger is None:
            merger = InMemoryMerger(grid, self.out_channels, self.blend)
        if post_whole and not isinstance(merger, InMemoryMerger):
            raise EfficientBioAIError(
                "the model's post-processing needs whole-image statistics "
                f"({', '.join(s['id'] for s in post_whole)}), which out-of-core inference cannot compute",
                "set tiling.out_of_core: false",
            )
        tiles = grid.tiles
        fill = plan.fill if plan.fill is not None else np.zeros(len(tiles), bool)
        todo = [
            (t, 2 if f else int(bool(s)))  # 0 run, 1 blend the value, 2 write the value
            for t, s, f in zip(tiles, plan.skipped, fill, strict=True)
            if merger.needs(t)
        ]
        run = [t for t, s in todo if not s]
        if progress is not None:
            progress.reset(total=len(todo))

        # filled NaN / inf (nonfinite: fill): their outputs are marked NaN, tile by tile, so that every
        # merger blends the same marks (after whole-image post-processing, when there is some)
        mask = image.mask if isinstance(image, Filled) else None
        masks: collections.deque = collections.deque()

        def batches() -> Iterator[np.ndarray]:
            for i in range(0, len(run), self.batch_size):
                chunk = run[i : i + self.batch_size]
                x = np.stack([grid.read(image, t) for t in chunk])
                if mask is not None and not post_whole:
                    masks.append([grid.read(mask, t)[0] > 0 for t in chunk])
                yield apply_steps(x, plan.pre, self.axes) if plan.pre else x

        def outputs() -> Iterator[np.ndarray]:
            for out in self.engine.map(batches()):
                out = self._check(out, grid)
                if post_tile:
                    out = apply_steps(out, post_tile, self.axes)
                if mask is not None and not post_whole:
                    out = out if out.flags.writeable else out.copy()
                    for tile_out, bad in zip(out, masks.popleft(), strict=True):
                        tile_out[:, bad] = np.nan
                yield from out

        # a skipped tile that run tiles overlap is blended only where they do; the rest of it is the value
        boxes = grid.overlap_boxes(~plan.skipped, [t.index for t, s in todo if s == 1])
        results = outputs()
        for t, skip in todo:  # grid order, skipped tiles included: every merger adds in the same order
            if skip == 2:
                merger.fill_constant(t, plan.value)
            elif skip:
                box = boxes.get(t.index)
                merger.aggregate_constant(t, plan.value, box)
                for part in box_difference(t.target, box) if box is not None else ():
                    merger.fill_constant(t, plan.value, part)
            else:
                merger.aggregate(t, next(results))
            if progress is not None:
                progress.update(1)
        for _ in results:  # closes the engine pipeline
            pass

        output = merger.finalize()
        if output is not None and post_whole:
            output = apply_steps(output[np.newaxis], post_whole, self.axes)[0]
            if mask is not None:
                output[:, np.asarray(mask)[0] > 0] = np.nan
        return Prediction(
            output=output,
            seconds=time.perf_counter() - t0,
            tiles=len(tiles),
            skipped=int(plan.skipped.sum()),
            background_threshold=plan.threshold,
            tile_shape=grid.tile,
            computed=len(run),
            visited=len(todo),
            skipped_fraction=plan.skipped_fraction,
            localization=plan.localization,
        )

    def _check(self, out: np.ndarray, grid: TileGrid) -> np.ndarray:
        if out.ndim != 2 + len(grid.tile) or tuple(out.shape[2:]) != grid.tile:
            raise EfficientBioAIError(
                f"the engine returned a tile of shape {tuple(out.shape)} for input tiles {grid.tile}: the "
                "network changes the spatial size, which sliding-window inference does not support",
                "use a network whose output has its input's spatial shape",
            )
        if out.shape[1] != self.out_channels:
            raise EfficientBioAIError(
                f"the engine returned {out.shape[1]} channel(s) but the manifest says {self.out_channels}",
                "the artifact directory is inconsistent: re-run `efficientbioai compress`",
            )
        return out


def _cheap_statistic(image, tile: Tile, stride: int = 4) -> float:
    """The background statistic of a tile's inner region, read with a stride (a 1/4^ndim sample)."""
    region = tuple(slice(t.start, t.stop, stride) for t in tile.target)
    return tile_statistic(np.asarray(image[(slice(None), *region)], np.float32))


def sample_localizer(cfg: LocalizeConfig) -> SampleLocalizer | None:
    """The ``tiling.localize`` options as a :class:`SampleLocalizer` (``None`` when disabled)."""
    if not cfg.enabled:
        return None
    return SampleLocalizer(
        downsample=None if cfg.downsample == "auto" else cfg.downsample,
        sigma=cfg.sigma,
        min_size=cfg.min_size,
        margin=None if cfg.margin == "auto" else cfg.margin,
        region=cfg.region,
        invert=cfg.invert,
        value=cfg.value,
    )
