"""Sliding-window tiling: the tile grid, padding, halo cropping, blending weights and background skipping.

Coordinates are spatial only; images are (C, *spatial) arrays (NumPy, memory-mapped TIFF or zarr: tiles
are sliced lazily, so a volume never has to fit in memory as float32 to be read).

For an axis of size ``S`` with network tile ``T`` and halo ``H`` (border pixels of the network's output
that are not trusted), each tile contributes its *inner* region of ``I = T - 2H`` pixels. Inner regions
start every ``step = I × (1 - overlap)`` pixels; the last one is moved back to end at the image border,
as MONAI's ``sliding_window_inference`` does, so the grid of a model without halo is MONAI's grid. The
network input is the inner region plus ``H`` pixels of context on each side, mirrored (``reflect``) where
it extends past the image. An image smaller than a tile is padded, and the tile shrinks to the smallest
shape the network accepts that still covers it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from efficientbioai.errors import ConfigError

BLEND_MODES = ("gaussian", "constant")


def valid_size(size: int, tmin: int, step: int) -> bool:
    return size >= tmin and (size - tmin) % step == 0


def round_up(size: int, tmin: int, step: int) -> int:
    """The smallest size ``tmin + k × step`` (k ≥ 0) that is at least ``size``."""
    return tmin + max(0, -(-(size - tmin) // step)) * step


def check_tile_shape(
    tile: Sequence[int], tile_min: Sequence[int], tile_step: Sequence[int], what: str = "tile_shape"
) -> tuple[int, ...]:
    """``tile`` if the network accepts it, else a :class:`ConfigError` suggesting the nearest valid shape."""
    if len(tile) != len(tile_min):
        raise ConfigError(
            f"{what}: {list(tile)} has {len(tile)} values but the model is {len(tile_min)}D",
            f"give {len(tile_min)} values, e.g. {what}: {list(tile_min)}",
        )
    if not all(valid_size(t, m, s) for t, m, s in zip(tile, tile_min, tile_step, strict=True)):
        suggestion = [round_up(t, m, s) for t, m, s in zip(tile, tile_min, tile_step, strict=True)]
        raise ConfigError(
            f"{what}: {list(tile)} is not a shape this network accepts (valid sizes per axis are "
            f"{list(tile_min)} + k × {list(tile_step)})",
            f"use {what}: {suggestion}",
        )
    return tuple(int(t) for t in tile)


@dataclass(frozen=True)
class Tile:
    """One grid position: where its network input comes from and where its trusted output goes."""

    index: int
    source: tuple[slice, ...]  # part of the image inside the input window
    pad: tuple[tuple[int, int], ...]  # mirrored padding around ``source`` to reach the tile shape
    target: tuple[slice, ...]  # where the inner output lands in the image
    crop: tuple[slice, ...]  # the inner output inside the network output tile


@dataclass(frozen=True)
class TileGrid:
    image_shape: tuple[int, ...]
    tile: tuple[int, ...]
    halo: tuple[int, ...]
    overlap: float
    starts: tuple[tuple[int, ...], ...]

    @classmethod
    def build(
        cls,
        image_shape: Sequence[int],
        tile: Sequence[int],
        *,
        overlap: float = 0.25,
        halo: Sequence[int] | None = None,
        tile_min: Sequence[int] | None = None,
        tile_step: Sequence[int] | None = None,
        align: Sequence[int] | None = None,
    ) -> TileGrid:
        """``align``: tiles start on multiples of it per axis (outputs at 1/k of the input's scale need
        tiles that start on their k×k blocks); the image's size must then be a multiple of it."""
        ndim = len(image_shape)
        if len(tile) != ndim:
            raise ConfigError(
                f"tiling.tile_shape: {list(tile)} has {len(tile)} values for a {ndim}D image {tuple(image_shape)}",
                f"give {ndim} values",
            )
        if not 0 <= overlap < 1:
            raise ConfigError(f"tiling.overlap: {overlap} is outside [0, 1)", "use e.g. overlap: 0.25")
        halo = tuple(int(h) for h in (halo or [0] * ndim))
        tile_min = tuple(tile_min or [1] * ndim)
        tile_step = tuple(tile_step or [1] * ndim)
        align = tuple(align or [1] * ndim)
        tiles, starts = [], []
        for axis, (s, t, h, m, st, a) in enumerate(
            zip(image_shape, tile, halo, tile_min, tile_step, align, strict=True)
        ):
            if a > 1 and (s % a or h % a or t % a):
                raise ConfigError(
                    f"the image's size {s} along spatial axis {axis} (tile {t}, halo {h}) is not a multiple "
                    f"of {a}, which an output at 1/{a} of the input's scale needs",
                    f"crop or pad the image to a multiple of {a} along that axis",
                )
            if t - 2 * h < 1:
                raise ConfigError(
                    f"tiling.tile_shape: {list(tile)} leaves nothing inside the model's halo {list(halo)}",
                    f"use tiles larger than {[2 * x + 1 for x in halo]}",
                )
            if s + 2 * h < t:  # the image is smaller than a tile: shrink it to what covers the image
                t = max(round_up(s + 2 * h, m, st), m)
            inner = t - 2 * h
            step = max(a, int(inner * (1 - overlap)) // a * a)
            n = 1 if s <= inner else 1 + -(-(s - inner) // step)
            starts.append(tuple(min(i * step, max(s - inner, 0)) for i in range(n)))
            tiles.append(t)
        return cls(tuple(int(s) for s in image_shape), tuple(tiles), halo, overlap, tuple(starts))

    def __getstate__(self) -> dict:
        # the cached tiles and weights are rebuilt on use: a grid sent to Dask workers stays a few bytes
        return {k: v for k, v in self.__dict__.items() if k not in ("tiles", "_inverse", "_gaussian")}

    @property
    def inner(self) -> tuple[int, ...]:
        return tuple(t - 2 * h for t, h in zip(self.tile, self.halo, strict=True))

    def __len__(self) -> int:
        return int(np.prod([len(s) for s in self.starts]))

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    @functools.cached_property
    def tiles(self) -> tuple[Tile, ...]:
        """Every tile, in grid order (built once per grid)."""
        return tuple(
            self._tile(index, corner) for index, corner in enumerate(itertools.product(*self.starts))
        )

    @functools.cached_property
    def _inverse(self) -> dict[str, tuple[np.ndarray, ...]]:
        return {}

    def inverse_axis_weights(self, mode: str) -> tuple[np.ndarray, ...]:
        """Per axis, 1 / (sum over the grid's tiles of that axis' blending weights) (float32).

        The tile weights are outer products of per-axis weights and the tiles form a Cartesian grid, so
        the sum of every tile's weights at a pixel is the product of these per-axis sums.
        """
        if mode in self._inverse:
            return self._inverse[mode]
        out = []
        for s, starts, i in zip(self.image_shape, self.starts, self.inner, strict=True):
            a = axis_weights(i, mode)
            total = np.zeros(s, np.float32)
            for c in starts:
                end = min(c + i, s)
                total[c:end] += a[: end - c]
            out.append(np.reciprocal(total))
        self._inverse[mode] = tuple(out)
        return self._inverse[mode]

    def _tile(self, index: int, corner: Sequence[int]) -> Tile:
        source, pad, target, crop = [], [], [], []
        for c, s, t, h, i in zip(corner, self.image_shape, self.tile, self.halo, self.inner, strict=True):
            lo, hi = c - h, c - h + t  # input window in image coordinates
            source.append(slice(max(lo, 0), min(hi, s)))
            pad.append((max(-lo, 0), max(hi - s, 0)))
            end = min(c + i, s)
            target.append(slice(c, end))
            crop.append(slice(h, h + end - c))
        return Tile(index, tuple(source), tuple(pad), tuple(target), tuple(crop))

    def touching(self, mask: Sequence[bool]) -> np.ndarray:
        """Per tile (grid order): whether its target region overlaps the target of a tile in ``mask``."""
        counts = [len(s) for s in self.starts]
        hits = np.asarray(mask, bool).reshape(counts).astype(np.int64)
        for d, (starts, i, s) in enumerate(zip(self.starts, self.inner, self.image_shape, strict=True)):
            lo = np.asarray(starts)
            hi = np.minimum(lo + i, s)
            overlaps = ((lo[:, None] < hi[None, :]) & (lo[None, :] < hi[:, None])).astype(np.int64)
            hits = np.moveaxis(np.tensordot(overlaps, hits, axes=([1], [d])), 0, d)
        return hits.reshape(-1) > 0

    def overlap_boxes(self, run: Sequence[bool], tiles: Iterable[int]) -> dict[int, tuple[slice, ...]]:
        """For each tile index in ``tiles``: the bounding box (image coordinates) of where its target
        overlaps the targets of the tiles in ``run`` (a bool per tile, grid order); tiles that overlap no
        run tile are left out. Outside that box, a skipped tile's target is covered by skipped tiles only."""
        counts = [len(s) for s in self.starts]
        run = np.asarray(run, bool)
        near = []  # per axis and position: the positions whose targets overlap it
        for starts, i, s in zip(self.starts, self.inner, self.image_shape, strict=True):
            lo = np.asarray(starts)
            hi = np.minimum(lo + i, s)
            overlaps = (lo[:, None] < hi[None, :]) & (lo[None, :] < hi[:, None])
            near.append([np.flatnonzero(row) for row in overlaps])
        out = {}
        for index in tiles:
            position = np.unravel_index(index, counts)
            target = self.tiles[index].target
            box = None
            for ks in itertools.product(*(near[d][k] for d, k in enumerate(position))):
                if not run[np.ravel_multi_index(ks, counts)]:
                    continue
                part = [
                    (max(t.start, c), min(t.stop, c + i, s))
                    for t, c, i, s in zip(
                        target,
                        (self.starts[d][k] for d, k in enumerate(ks)),
                        self.inner,
                        self.image_shape,
                        strict=True,
                    )
                ]
                box = (
                    part
                    if box is None
                    else [(min(a, c), max(b, d)) for (a, b), (c, d) in zip(box, part, strict=True)]
                )
            if box is not None:
                out[int(index)] = tuple(slice(a, b) for a, b in box)
        return out

    def tiles_in(self, region: Sequence[slice]) -> Iterator[Tile]:
        """The tiles whose inner output overlaps ``region`` (spatial slices), in grid order."""
        keep = [
            [k for k, c in enumerate(starts) if c < r.stop and min(c + i, s) > r.start]
            for starts, r, i, s in zip(self.starts, region, self.inner, self.image_shape, strict=True)
        ]
        counts = [len(s) for s in self.starts]
        for ks in itertools.product(*keep):
            index = int(np.ravel_multi_index(ks, counts))
            yield self._tile(index, [self.starts[d][k] for d, k in enumerate(ks)])

    def read(self, image, tile: Tile) -> np.ndarray:
        """The (C, *tile) float32 network input for ``tile`` from a (C, *spatial) array-like."""
        x = np.asarray(image[(slice(None), *tile.source)], dtype=np.float32)
        if any(p for pair in tile.pad for p in pair):
            # reflect needs at least 2 pixels along an axis; a 1-pixel axis is repeated instead
            mode = "reflect" if all(n > 1 for n in x.shape[1:]) else "edge"
            x = np.pad(x, ((0, 0), *tile.pad), mode=mode)
        return x

    @functools.cached_property
    def _gaussian(self) -> np.ndarray:
        return blend_weights(self.inner, "gaussian")

    def weights(self, tile: Tile, mode: str) -> np.ndarray | None:
        """Blending weights of the tile's inner output (``None`` means all ones)."""
        if mode == "constant":
            return None
        w = self._gaussian
        return w[tuple(slice(0, c.stop - c.start) for c in tile.crop)]


def box_difference(outer: Sequence[slice], inner: Sequence[slice]) -> list[tuple[slice, ...]]:
    """Disjoint boxes that together cover ``outer`` minus ``inner`` (``inner`` lies inside ``outer``)."""
    parts, rest = [], list(outer)
    for d, (o, i) in enumerate(zip(outer, inner, strict=True)):
        if o.start < i.start:
            parts.append((*rest[:d], slice(o.start, i.start), *rest[d + 1 :]))
        if i.stop < o.stop:
            parts.append((*rest[:d], slice(i.stop, o.stop), *rest[d + 1 :]))
        rest[d] = slice(i.start, i.stop)
    return parts


def bounding(box: list[list[int]] | None, region: Sequence[slice]) -> list[list[int]]:
    """``box`` ([[start, stop], ...], or None for empty) grown to hold ``region``."""
    if box is None:
        return [[r.start, r.stop] for r in region]
    return [[min(b[0], r.start), max(b[1], r.stop)] for b, r in zip(box, region, strict=True)]


def within(region: Sequence[slice], outer: Sequence[slice]) -> tuple[slice, ...]:
    """``region`` (inside ``outer``) in ``outer``'s coordinates."""
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, outer, strict=True))


def constant_output(grid: TileGrid, tile: Tile, value, region: Sequence[slice], mode: str) -> np.ndarray:
    """The weighted output (C, *region shape) of a tile whose output is ``value`` (one number per
    channel) everywhere, inside ``region`` (a box within its target, image coordinates)."""
    w = grid.weights(tile, mode)
    shape = tuple(r.stop - r.start for r in region)
    w = np.ones(shape, np.float32) if w is None else w[within(region, tile.target)]
    return np.asarray(value, np.float32).reshape(-1, *[1] * len(shape)) * w


WEIGHT_FLOOR = 1e-3  # per axis: every pixel keeps a positive weight (at least 1e-3 ** ndim)


def axis_weights(n: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights along one tile axis of ``n`` pixels (float32): 1 everywhere (``constant``) or a
    gaussian centred on the tile whose sigma is ``sigma_scale`` × ``n``, peak 1, floored at
    :data:`WEIGHT_FLOOR`."""
    if mode == "constant":
        return np.ones(n, np.float32)
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    w = np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2)
    return np.maximum(w / w.max(), WEIGHT_FLOOR).astype(np.float32)


def blend_weights(shape: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """Per-pixel weights of a tile: the outer product of :func:`axis_weights` along each axis.

    Separable weights make the per-pixel sum of weights over a grid separable too
    (:meth:`TileGrid.inverse_axis_weights`): normalising never needs an image-sized weight map.
    """
    if mode not in BLEND_MODES:
        raise ConfigError(f"tiling.blend: unknown mode '{mode}'", f"use one of {', '.join(BLEND_MODES)}")
    w = np.ones((), np.float32)
    for n in shape:
        w = np.multiply.outer(w, axis_weights(n, mode, sigma_scale))
    return w


def normalize(total: np.ndarray, grid: TileGrid, mode: str, region: Sequence[slice] | None = None) -> None:
    """Divide the blended sum ``total`` (C, *region shape) by the grid's sum of weights, in place.

    ``region`` (spatial slices of the image; default: the whole image) says where ``total`` lies. The
    division is one multiplication per axis with that axis' inverse weights, in axis order, so a region
    gives exactly (to the bit) the pixels the whole image gives there.
    """
    inverse = grid.inverse_axis_weights(mode)
    region = region or tuple(slice(0, s) for s in grid.image_shape)
    ndim = len(inverse)
    for d, (r, sl) in enumerate(zip(inverse, region, strict=True)):
        shape = [1] * (ndim + 1)
        shape[d + 1] = sl.stop - sl.start
        np.multiply(total, r[sl].reshape(shape), out=total)


class Blender:
    """Accumulates weighted tile outputs into a (C, *spatial) image; :meth:`result` normalises.

    The per-pixel sum of weights depends only on the grid (every tile, run or skipped, is added with the
    same weights) and is separable (:func:`blend_weights`), so it is not accumulated per tile:
    :func:`normalize` divides by it axis by axis, and only inside the bounding box of what was added
    (elsewhere the caller writes values itself, e.g. skipped tiles' fills; the sum there stays zero and its
    memory untouched).
    """

    def __init__(self, grid: TileGrid, channels: int, mode: str = "gaussian"):
        if mode not in BLEND_MODES:
            raise ConfigError(f"tiling.blend: unknown mode '{mode}'", f"use one of {', '.join(BLEND_MODES)}")
        self.grid, self.mode = grid, mode
        self.sum = np.zeros((channels, *grid.image_shape), np.float32)
        self.touched: list[list[int]] | None = None  # bounding box of everything added

    def add(self, tile: Tile, output: np.ndarray) -> None:
        """Add one network output tile (C, *tile), halo included: only its inner region is used.

        ``output`` may be overwritten (the engines hand out a fresh array per batch).
        """
        inner = output[(slice(None), *tile.crop)]
        w = self.grid.weights(tile, self.mode)
        if w is not None:
            inner = np.multiply(inner, w, out=inner) if inner.flags.writeable else inner * w
        self.sum[(slice(None), *tile.target)] += inner
        self.touched = bounding(self.touched, tile.target)

    def add_constant(self, tile: Tile, value: np.ndarray, region: Sequence[slice] | None = None) -> None:
        """Add a tile whose output is ``value`` (one number per channel) everywhere, inside ``region`` (a
        box within the tile's target, image coordinates; default: the whole target)."""
        region = tuple(region or tile.target)
        self.sum[(slice(None), *region)] += constant_output(self.grid, tile, value, region, self.mode)
        self.touched = bounding(self.touched, region)

    def result(self) -> np.ndarray:
        if self.touched is not None:
            box = tuple(slice(a, b) for a, b in self.touched)
            normalize(self.sum[(slice(None), *box)], self.grid, self.mode, box)
        return self.sum


# ------------------------------------------------------------------------------ background skipping


def tile_statistic(x: np.ndarray) -> float:
    """How much a (C, *tile) input varies: its standard deviation (cheap; flat background is ~noise)."""
    return float(np.std(x, dtype=np.float64))


def estimate_background_threshold(stats: Sequence[float], factor: float = 2.0) -> float:
    """A tile is background when its statistic is below ``factor`` × the 10th percentile of all tiles'.

    The assumption, as in the calibration sampler: at least a tenth of the tiles are flat background
    (true of most light-sheet and slide scans, where the sample fills 20–30% of the field). On an
    image that is sample everywhere set ``tiling.background.threshold`` yourself or leave skipping off.
    """
    return float(factor * np.percentile(np.asarray(stats, np.float64), 10)) if len(stats) else 0.0
