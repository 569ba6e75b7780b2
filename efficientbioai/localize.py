"""Sample localisation: where in a sparse volume (CT, cleared tissue, a slide scan) the sample is.

A first pass reads a block-averaged, downsampled copy of the image slab by slab (a memory map or zarr
array is never loaded at full resolution; the copy holds at most ``max_voxels`` voxels), smooths it with
a gaussian, thresholds it with Otsu's method, drops components smaller than ``min_size``, fills holes
and grows the foreground by a margin. :func:`localize` returns that low-resolution mask, the bounding
boxes of its components in full-resolution coordinates and the fraction of voxels outside.

:class:`SampleLocalizer` applies it to a tile grid (``tiling.localize`` in ``efficientbioai infer``): a
tile runs when its inner (target) region touches the grown mask, or with ``region="box"`` the bounding box
of a component. Every tile whose output blends into a foreground voxel therefore runs, so the stitched
output there is the output of the run without localisation, bit for bit; the other tiles are skipped
through the background-skip path of :class:`~efficientbioai.infer.predict.Predictor`.

Assumption, as for any global threshold: the image is sample on a darker (or brighter, ``invert``)
background that fills a good part of the field. An image that is sample everywhere comes out as one region
covering it (nothing is skipped); where Otsu finds no foreground at all, the whole image runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from efficientbioai.errors import ConfigError
from efficientbioai.io.cache import bypassing
from efficientbioai.tiling import Tile, TileGrid

DEFAULT_MAX_VOXELS = 2**21  # the low-resolution copy: at most ~2 M voxels (8 MB as float32)
READ_BYTES = 64 * 2**20  # float32 bytes read from the full-resolution image at once


@dataclass
class Localization:
    """Where the sample is. Spatial coordinates only; ``mask`` is at low resolution (``factor``)."""

    shape: tuple[int, ...]  # full-resolution spatial shape
    factor: tuple[int, ...]  # downsampling factor per axis
    threshold: float | None  # Otsu threshold on the smoothed low-resolution copy (None: nothing to split)
    mask: np.ndarray  # bool, the grown foreground at low resolution; voxel i covers [i*f, (i+1)*f)
    regions: list[tuple[slice, ...]] = field(default_factory=list)  # full-resolution boxes, one per component
    found: bool = True  # False: no foreground was found and the mask covers everything
    image: np.ndarray | None = None  # the low-resolution copy (block means, before smoothing)

    @property
    def fraction_outside(self) -> float:
        """Fraction of the full-resolution voxels outside the grown foreground mask."""
        sizes = [block_sizes(n, f) for n, f in zip(self.shape, self.factor, strict=True)]
        volume = np.ones((), np.float64)
        for s in sizes:
            volume = np.multiply.outer(volume, s.astype(np.float64))
        inside = float((volume * self.mask).sum())
        return 1.0 - inside / float(np.prod(self.shape, dtype=np.float64))

    def lowres(self, target: Sequence[slice]) -> tuple[slice, ...]:
        """The low-resolution voxels that cover a full-resolution region (conservatively)."""
        return tuple(slice(s.start // f, -(-s.stop // f)) for s, f in zip(target, self.factor, strict=True))

    def touches(self, target: Sequence[slice], region: str = "mask") -> bool:
        """Whether a full-resolution region touches the grown mask (``"mask"``) or a region box (``"box"``)."""
        if region == "box":
            return any(
                all(t.start < r.stop and r.start < t.stop for t, r in zip(target, box, strict=True))
                for box in self.regions
            )
        return bool(self.mask[self.lowres(target)].any())


def block_sizes(n: int, f: int) -> np.ndarray:
    """Lengths of the blocks of ``f`` pixels that tile an axis of ``n`` (the last one may be shorter)."""
    starts = np.arange(0, n, f)
    return np.minimum(starts + f, n) - starts


def auto_factor(shape: Sequence[int], max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[int, ...]:
    """One factor for every axis, the smallest power of two that keeps the downsampled copy under
    ``max_voxels`` voxels (powers of two divide the usual zarr chunk sizes, so reads stay aligned)."""
    f = 1
    while np.prod([-(-n // f) for n in shape], dtype=np.float64) > max_voxels:
        f *= 2
    return tuple(min(f, n) for n in shape)


def _storage_chunks(image, has_channels: bool, ndim: int) -> tuple[int, ...]:
    """The spatial chunk shape of a zarr array (or a lazy view of one), else ones."""
    for obj in (image, getattr(image, "array", None)):  # infer's channel view keeps the array
        chunks = getattr(obj, "chunks", None)
        if isinstance(chunks, tuple) and len(chunks) >= ndim and all(isinstance(c, int) for c in chunks):
            return tuple(chunks[-ndim:])
    return (1,) * ndim


def downsample(
    image, factor: Sequence[int], *, has_channels: bool = True, read_bytes: int = READ_BYTES
) -> np.ndarray:
    """Block means of ``factor`` voxels per axis (channels averaged), as float32.

    ``image`` is a (C, *spatial) array-like (``has_channels``) or a spatial one: a NumPy array, a memory
    map or a zarr array. It is read in blocks of whole downsampling blocks along the first two spatial
    axes (aligned to the zarr chunks when that fits, so no chunk is decompressed twice), each at most
    about ``read_bytes`` as float32: the full-resolution image is never held in memory (and a read cache
    under it is bypassed: :func:`~efficientbioai.io.cache.bypassing`). Blocks at the
    far border may be shorter than ``factor``; their mean is over the voxels they hold.
    """
    spatial = tuple(int(n) for n in (image.shape[1:] if has_channels else image.shape))
    factor = tuple(int(f) for f in factor)
    if len(spatial) < 2 or len(factor) != len(spatial):
        raise ValueError(
            f"downsample: need a 2D or 3D image and one factor per axis, got {spatial}, {factor}"
        )
    channels = int(image.shape[0]) if has_channels else 1
    out = np.empty([-(-n // f) for n, f in zip(spatial, factor, strict=True)], np.float32)
    lead = (slice(None),) if has_channels else ()
    f0, f1 = factor[:2]
    c0, c1 = _storage_chunks(image, has_channels, len(spatial))[:2]
    rest = channels * int(np.prod(spatial[2:], dtype=np.int64)) * 4  # bytes of one (axis 0, axis 1) line
    depth, unit = min(math.lcm(f0, c0), spatial[0]), math.lcm(f1, c1)
    if depth * unit * rest > read_bytes:  # chunks too large for the budget: read whole blocks only
        depth, unit = f0, f1
    depth = -(-depth // f0) * f0
    rows = max(1, read_bytes // (depth * unit * rest)) * unit
    with bypassing(image):  # one pass over the whole image: not through the tiles' read cache
        for i0 in range(0, spatial[0], depth):
            for j0 in range(0, spatial[1], rows):
                x = np.asarray(image[(*lead, slice(i0, i0 + depth), slice(j0, j0 + rows))], np.float32)
                if has_channels:
                    x = x[0] if channels == 1 else x.mean(axis=0, dtype=np.float32)
                for axis, f in enumerate(factor):
                    x = block_mean(x, axis, f)
                out[i0 // f0 : i0 // f0 + x.shape[0], j0 // f1 : j0 // f1 + x.shape[1]] = x
    return out


def block_mean(x: np.ndarray, axis: int, f: int) -> np.ndarray:
    """Means of blocks of ``f`` along ``axis`` (float32; a shorter last block is the mean of what it holds).

    Summed as ``f`` strided slices: whole-array vector additions, several times faster than
    ``np.add.reduceat`` on large blocks.
    """
    if f == 1:
        return np.asarray(x, np.float32)
    n = x.shape[axis]
    full = n // f * f

    def part(start: int, stop: int, step: int = 1) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop, step)
        return x[tuple(index)]

    pieces = []
    if full:
        total = part(0, full, f).astype(np.float32)
        for k in range(1, f):
            total += part(k, full, f)
        total *= np.float32(1 / f)
        pieces.append(total)
    if full < n:
        pieces.append(part(full, n).mean(axis=axis, keepdims=True, dtype=np.float32))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)


def localize(
    image,
    *,
    downsample_factor: int | Sequence[int] | None = None,
    sigma: float = 1.0,
    min_size: int = 0,
    margin: int | Sequence[int] = 0,
    invert: bool = False,
    has_channels: bool = True,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Localization:
    """Find the sample in ``image`` ((C, *spatial) array-like, or spatial with ``has_channels=False``).

    ``downsample_factor``: per axis (or one for all; default: :func:`auto_factor` for ``max_voxels``).
    ``sigma``: gaussian smoothing of the low-resolution copy, in low-resolution voxels.
    ``min_size``: foreground components smaller than this many full-resolution voxels are dropped.
    ``margin``: full-resolution voxels (per axis, or one for all) by which the foreground is grown; the
    growth is rounded up to whole low-resolution voxels. ``invert``: the sample is darker than the
    background (e.g. bright-field).
    """
    from scipy import ndimage

    spatial = tuple(int(n) for n in (image.shape[1:] if has_channels else image.shape))
    ndim = len(spatial)
    if downsample_factor is None:
        factor = auto_factor(spatial, max_voxels)
    else:
        factor = per_axis(downsample_factor, ndim, "downsample")
        if any(f < 1 for f in factor):
            raise ConfigError(
                f"tiling.localize.downsample: {list(factor)} must be positive integers",
                "use e.g. downsample: 4, or auto",
            )
        factor = tuple(min(f, n) for f, n in zip(factor, spatial, strict=True))
    grow = per_axis(margin, ndim, "margin")
    if any(m < 0 for m in grow):
        raise ConfigError(f"tiling.localize.margin: {list(grow)} must not be negative", "use e.g. margin: 8")
    copy = downsample(image, factor, has_channels=has_channels)
    low = -copy if invert else copy
    if sigma > 0:
        low = ndimage.gaussian_filter(low, sigma, mode="nearest")
    everything = Localization(
        spatial, factor, None, np.ones(low.shape, bool), [_full(spatial)], found=False, image=copy
    )
    if not np.isfinite(low).all() or float(low.max()) <= float(low.min()):
        return everything
    threshold = float(threshold_otsu(low))
    mask = low > threshold
    if min_size > 0:
        labels, n = ndimage.label(mask)
        if n:
            block = float(np.prod(factor))
            counts = np.bincount(labels.ravel(), minlength=n + 1) * block
            keep = counts >= min_size
            keep[0] = False
            mask = keep[labels]
    if not mask.any():
        everything.threshold = threshold
        return everything
    mask = ndimage.binary_fill_holes(mask)
    radius = [-(-m // f) for m, f in zip(grow, factor, strict=True)]
    if any(radius):
        mask = ndimage.maximum_filter(mask, size=[2 * r + 1 for r in radius], mode="constant", cval=0)
    labels, _ = ndimage.label(mask)
    regions = []
    for box in ndimage.find_objects(labels):
        if box is not None:
            regions.append(
                tuple(
                    slice(b.start * f, min(b.stop * f, n))
                    for b, f, n in zip(box, factor, spatial, strict=True)
                )
            )
    return Localization(spatial, factor, threshold, mask, regions, image=copy)


def threshold_otsu(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``x`` over a ``bins``-bin histogram (as scikit-image's ``threshold_otsu``,
    without importing scikit-image's filters, which takes seconds on a busy machine)."""
    counts, edges = np.histogram(x, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float64)
    w0 = np.cumsum(counts)  # pixels at or below each bin
    w1 = np.cumsum(counts[::-1])[::-1]  # pixels at or above each bin
    m0 = np.cumsum(counts * centres) / np.maximum(w0, 1)
    m1 = (np.cumsum((counts * centres)[::-1]) / np.maximum(w1[::-1], 1))[::-1]
    between = w0[:-1] * w1[1:] * (m0[:-1] - m1[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def per_axis(value: int | Sequence[int], ndim: int, key: str) -> tuple[int, ...]:
    """One value per spatial axis from a number or a list (a list of the wrong length is an error)."""
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    values = tuple(int(v) for v in value)
    if len(values) != ndim:
        raise ConfigError(
            f"tiling.localize.{key}: {list(values)} has {len(values)} values for a {ndim}D image",
            f"give one number for all axes or {ndim} values",
        )
    return values


def _full(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def uncovered_fraction(grid: TileGrid, tiles: Sequence[Tile]) -> float:
    """Fraction of the grid's image that no tile in ``tiles`` covers with its inner (target) region.

    Exact and cheap for any image size: the targets' edges cut every axis into intervals, and coverage is
    counted on that small grid of interval products.
    """
    total = float(np.prod(grid.image_shape, dtype=np.float64))
    if not tiles:
        return 1.0
    edges = []
    for axis, n in enumerate(grid.image_shape):
        cuts = {0, n}
        for t in tiles:
            cuts.update((t.target[axis].start, t.target[axis].stop))
        edges.append(np.array(sorted(cuts)))
    covered = np.zeros([len(e) - 1 for e in edges], bool)
    for t in tiles:
        covered[
            tuple(
                slice(np.searchsorted(e, s.start), np.searchsorted(e, s.stop))
                for e, s in zip(edges, t.target, strict=True)
            )
        ] = True
    volume = np.ones((), np.float64)
    for e in edges:
        volume = np.multiply.outer(volume, np.diff(e).astype(np.float64))
    return 1.0 - float((volume * covered).sum()) / total


@dataclass
class Selection:
    """The outcome of :meth:`SampleLocalizer.select` for one image."""

    run: list[Tile]
    outside: list[Tile]
    localization: Localization
    background_tile: Tile | None  # the flattest tile outside the sample (for the background value)


@dataclass
class SampleLocalizer:
    """Tiling options of sample localisation (``tiling.localize``); see :func:`localize`.

    ``margin`` ``None`` means the model's halo plus one low-resolution voxel. ``value`` ``None`` means that
    skipped tiles get the engine's mean output (per channel) on the flattest tile outside the sample.
    """

    downsample: int | Sequence[int] | None = None
    sigma: float = 1.0
    min_size: int = 0
    margin: int | Sequence[int] | None = None
    region: str = "mask"
    invert: bool = False
    value: float | None = None
    max_voxels: int = DEFAULT_MAX_VOXELS

    def locate(self, image, halo: Sequence[int] | None = None) -> Localization:
        """:func:`localize` on a (C, *spatial) image with these options."""
        spatial = tuple(image.shape[1:])
        ndim = len(spatial)
        if self.region not in ("mask", "box"):
            raise ConfigError(f"tiling.localize.region: unknown '{self.region}'", "use mask or box")
        factor = (
            auto_factor(spatial, self.max_voxels)
            if self.downsample is None
            else per_axis(self.downsample, ndim, "downsample")
        )
        if self.margin is None:
            halo = tuple(halo or [0] * ndim)
            margin = tuple(h + f for h, f in zip(halo, factor, strict=True))
        else:
            margin = self.margin
        return localize(
            image,
            downsample_factor=factor,
            sigma=self.sigma,
            min_size=self.min_size,
            margin=margin,
            invert=self.invert,
            max_voxels=self.max_voxels,
        )

    def select(self, image, grid: TileGrid, tiles: Sequence[Tile], halo=None) -> Selection:
        """Split ``tiles`` into those that touch the sample (run) and those outside it (skipped)."""
        loc = self.locate(image, halo)
        run, outside = [], []
        for t in tiles:
            (run if loc.touches(t.target, self.region) else outside).append(t)
        background = min(outside, key=lambda t: _spread(loc, t)) if outside else None
        return Selection(run, outside, loc, background)


def _spread(loc: Localization, tile: Tile) -> float:
    """How much the low-resolution copy varies under a tile (the flattest tile outside the sample gives
    the background value, as in the background-skip path, without reading the image again)."""
    x = loc.image[loc.lowres(tile.target)]
    return float(np.std(x, dtype=np.float64)) if x.size else math.inf


__all__ = [
    "Localization",
    "SampleLocalizer",
    "Selection",
    "auto_factor",
    "block_mean",
    "block_sizes",
    "downsample",
    "localize",
    "uncovered_fraction",
]
