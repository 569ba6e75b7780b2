"""Predict one whole image with an engine: lazy tiles → engine (pipelined) → blended output.

Pre-processing steps that need whole-image statistics (per-sample normalisation, percentile scaling) are
applied to the whole image first; point-wise steps (fixed normalisation, scaling, clipping) are applied
per tile, so a memory-mapped TIFF or a zarr volume is then only ever read a tile at a time.
Post-processing is applied per tile when it is point-wise (e.g. a sigmoid) and to the stitched output
otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from efficientbioai.engines import Engine
from efficientbioai.errors import EfficientBioAIError
from efficientbioai.localize import uncovered_fraction
from efficientbioai.processing import apply_steps
from efficientbioai.tiling import (
    Blender,
    Tile,
    TileGrid,
    estimate_background_threshold,
    tile_statistic,
)

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
    output: np.ndarray  # (C_out, *spatial) float32
    seconds: float
    tiles: int
    skipped: int = 0
    background_threshold: float | None = None
    tile_shape: tuple[int, ...] = ()
    skipped_fraction: float = 0.0  # of the voxels, covered by no run tile (they hold the background value)
    localization: Any = None  # efficientbioai.localize.Localization when sample localisation ran


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

    def grid(self, spatial_shape: Sequence[int]) -> TileGrid:
        return TileGrid.build(
            spatial_shape,
            self.tile_shape,
            overlap=self.overlap,
            halo=self.halo,
            tile_min=self.tile_min,
            tile_step=self.tile_step,
        )

    def warm_up(self, channels: int) -> None:
        """One untimed engine call at the tile shape (first-call allocations and kernel selection)."""
        self.engine(np.zeros((self.batch_size, channels, *self.tile_shape), np.float32))

    def __call__(self, image, progress: Any = None) -> Prediction:
        t0 = time.perf_counter()
        spatial = tuple(image.shape[1:])
        grid = self.grid(spatial)
        pre_tile, pre_whole = split_pointwise(self.pre)
        if pre_whole:  # statistics over the whole image: normalise it once, in memory
            source = apply_steps(np.asarray(image, np.float32)[np.newaxis], self.pre, self.axes)[0]
            pre_tile = []
        else:
            source = image
        post_tile, post_whole = split_pointwise(self.post)

        tiles = list(grid)
        run, skipped, threshold = tiles, [], None
        if self.skip_background:
            stats = [_cheap_statistic(image, t) for t in tiles]
            threshold = self.background_threshold
            if threshold is None:
                threshold = estimate_background_threshold(stats)
            run = [t for t, s in zip(tiles, stats, strict=True) if s >= threshold]
            skipped = [t for t, s in zip(tiles, stats, strict=True) if s < threshold]
        selection = None
        if self.localizer is not None:  # tiles outside the sample join the skipped ones
            selection = self.localizer.select(image, grid, run, halo=self.halo)
            run, skipped = selection.run, skipped + selection.outside

        blender = Blender(grid, self.out_channels, self.blend)
        if progress is not None:
            progress.reset(total=len(tiles))

        def batches() -> Iterator[np.ndarray]:
            for i in range(0, len(run), self.batch_size):
                chunk = run[i : i + self.batch_size]
                x = np.stack([grid.read(source, t) for t in chunk])
                yield apply_steps(x, pre_tile, self.axes) if pre_tile else x

        done = 0
        for out in self.engine.map(batches()):
            out = self._check(out, grid)
            if post_tile:
                out = apply_steps(out, post_tile, self.axes)
            chunk = run[done : done + len(out)]
            for t, o in zip(chunk, out, strict=True):
                blender.add(t, o)
            done += len(chunk)
            if progress is not None:
                progress.update(len(chunk))

        if skipped:
            if self.localizer is not None and self.localizer.value is not None:
                value = np.full(self.out_channels, self.localizer.value, np.float32)
            else:
                flattest = selection.background_tile if selection is not None else None
                value = self._background_value(source, grid, skipped, pre_tile, post_tile, image, flattest)
            for t in skipped:
                blender.add_constant(t, value)
            if progress is not None:
                progress.update(len(skipped))

        output = blender.result()
        if post_whole:
            output = apply_steps(output[np.newaxis], post_whole, self.axes)[0]
        return Prediction(
            output=output,
            seconds=time.perf_counter() - t0,
            tiles=len(tiles),
            skipped=len(skipped),
            background_threshold=threshold,
            tile_shape=grid.tile,
            skipped_fraction=uncovered_fraction(grid, run) if skipped else 0.0,
            localization=selection.localization if selection is not None else None,
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

    def _background_value(
        self, source, grid, skipped: list[Tile], pre_tile, post_tile, image, flattest: Tile | None = None
    ) -> np.ndarray:
        """The engine's mean output (per channel) on the flattest skipped tile (or on ``flattest``)."""
        if flattest is None:
            flattest = min(skipped, key=lambda t: _cheap_statistic(image, t))
        x = grid.read(source, flattest)[np.newaxis]
        if pre_tile:
            x = apply_steps(x, pre_tile, self.axes)
        out = self.engine(x)
        if post_tile:
            out = apply_steps(out, post_tile, self.axes)
        inner = out[(0, slice(None), *flattest.crop)]
        return inner.reshape(inner.shape[0], -1).mean(axis=1)


def _cheap_statistic(image, tile: Tile, stride: int = 4) -> float:
    """The background statistic of a tile's inner region, read with a stride (a 1/4^ndim sample)."""
    region = tuple(slice(t.start, t.stop, stride) for t in tile.target)
    return tile_statistic(np.asarray(image[(slice(None), *region)], np.float32))
