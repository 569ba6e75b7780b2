"""Mergers: where blended tile outputs go (the whole image in memory, or a bounded band flushed to disk).

A :class:`Merger` receives the network output of every tile of a :class:`~efficientbioai.tiling.TileGrid`
in grid order (:meth:`Merger.aggregate`), or for a skipped tile, which gets one value per channel:
:meth:`Merger.aggregate_constant` where run tiles overlap it (the value is blended with their outputs)
and :meth:`Merger.fill_constant` where none does (the value exactly, written after normalising);
:meth:`Merger.finalize` returns the stitched result. Only the bounding box of what was blended is
normalised.

- :class:`InMemoryMerger`: the whole (C, *spatial) float32 output in memory; ``finalize`` returns it.
- :class:`RegionMerger`: only the part of the output inside one region (a box of the image), e.g. one
  block of a Dask run; tiles are still placed on the image's global grid, so a region gives exactly the
  pixels the whole-image merger gives there.
- :class:`BandMerger`: out-of-core. The output is cut into slabs along the slowest spatial axis, blended in
  a ring buffer of planes and written to a ``sink`` (e.g. a zarr array on disk) as soon as no later tile
  can touch them. Tiles arrive in grid order, so at most ``slab - 1 + inner tile size`` planes (rounded up
  to whole slabs) of output are held in memory, whatever the size of the image.

Every merger adds the same tile contributions in the same order and normalises with the same per-axis
inverse weights (:func:`~efficientbioai.tiling.normalize`), so their results are identical to the bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

from efficientbioai.tiling import Blender, Tile, TileGrid, bounding, constant_output, normalize

# sink(region, data): write data (C, *region shape) float32 at the region (spatial slices) of the output
Sink = Callable[[tuple[slice, ...], np.ndarray], None]
Box = Sequence[slice]  # spatial slices of the image


class Merger(ABC):
    """Blends tile outputs of one grid; see the module docstring."""

    grid: TileGrid

    def needs(self, tile: Tile) -> bool:
        """Whether the tile's output is still needed (``False`` for tiles of finished regions)."""
        return True

    @abstractmethod
    def aggregate(self, tile: Tile, output: np.ndarray) -> None:
        """Add one network output (C, *tile shape), halo included; ``output`` may be overwritten."""

    @abstractmethod
    def aggregate_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        """Add a skipped tile whose output is ``value`` (one number per channel) everywhere, inside
        ``region`` (a box within the tile's target, image coordinates; default: the whole target)."""

    def fill_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        """Part of a skipped tile (``region``, default its whole target) that no run tile overlaps: it is
        ``value`` exactly (no blending needed, every tile there has the same value). Mergers write it after
        normalising; the default blends it."""
        self.aggregate_constant(tile, value, region)

    @abstractmethod
    def finalize(self) -> np.ndarray | None:
        """Normalise what is left and return the result (``None`` when it went to a sink)."""


class InMemoryMerger(Merger):
    """The whole (C, *spatial) output in memory: :class:`~efficientbioai.tiling.Blender`."""

    def __init__(self, grid: TileGrid, channels: int, blend: str = "gaussian"):
        self.grid = grid
        self._blender = Blender(grid, channels, blend)
        self._fills: list[tuple[tuple[slice, ...], np.ndarray]] = []

    def aggregate(self, tile: Tile, output: np.ndarray) -> None:
        self._blender.add(tile, output)

    def aggregate_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        self._blender.add_constant(tile, value, region)

    def fill_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        _add_fill(self._fills, tuple(region or tile.target), value)

    def finalize(self) -> np.ndarray:
        out = self._blender.result()
        _fill(out, self._fills)
        return out


def _fill(out: np.ndarray, fills: Sequence[tuple[tuple[slice, ...], np.ndarray]]) -> None:
    """Write each (region, per-channel value) into the (C, *spatial) ``out``."""
    for region, value in fills:
        view = out[(slice(None), *region)]
        view[...] = np.asarray(value, np.float32).reshape(-1, *[1] * (view.ndim - 1))


def _add_fill(fills: list, box: tuple[slice, ...], value: np.ndarray) -> None:
    """Record a fill; one that continues the previous one along the last axis (the next skipped tile of
    a row, same value) extends it instead, so a row of skipped tiles is one box, not one per tile."""
    if fills:
        last, v = fills[-1]
        if (
            (v is value or np.array_equal(v, value))
            and last[:-1] == box[:-1]
            and last[-1].start <= box[-1].start <= last[-1].stop
        ):
            fills[-1] = ((*last[:-1], slice(last[-1].start, max(last[-1].stop, box[-1].stop))), v)
            return
    fills.append((box, value))


def _intersection(target: tuple[slice, ...], region: tuple[slice, ...]) -> tuple[slice, ...] | None:
    out = []
    for t, r in zip(target, region, strict=True):
        lo, hi = max(t.start, r.start), min(t.stop, r.stop)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return tuple(out)


def _shift(box: tuple[slice, ...], origin: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(b.start - o, b.stop - o) for b, o in zip(box, origin, strict=True))


class RegionMerger(Merger):
    """The output inside ``region`` (spatial slices) only; tiles outside it are ignored.

    ``finalize`` returns the (C, *region shape) float32 result, or hands it to ``sink`` and returns
    ``None`` when a sink is given.
    """

    def __init__(
        self,
        grid: TileGrid,
        channels: int,
        region: Sequence[slice],
        blend: str = "gaussian",
        sink: Sink | None = None,
    ):
        self.grid, self.blend, self.sink = grid, blend, sink
        self.region = tuple(slice(int(r.start), int(r.stop)) for r in region)
        self.origin = [r.start for r in self.region]
        self.sum = np.zeros((channels, *(r.stop - r.start for r in self.region)), np.float32)
        self._fills: list[tuple[tuple[slice, ...], np.ndarray]] = []
        self._touched: list[list[int]] | None = None  # bounding box (region coordinates) of what was added

    def needs(self, tile: Tile) -> bool:
        return _intersection(tile.target, self.region) is not None

    def _parts(self, tile: Tile, box: Box | None = None):
        part = _intersection(tuple(box or tile.target), self.region)
        if part is None:
            return None
        return _shift(part, self.origin), _shift(part, [t.start for t in tile.target])

    def aggregate(self, tile: Tile, output: np.ndarray) -> None:
        parts = self._parts(tile)
        if parts is None:
            return
        here, within = parts  # where in the region, where in the tile's inner output
        inner = output[(slice(None), *tile.crop)][(slice(None), *within)]
        w = self.grid.weights(tile, self.blend)
        if w is not None:
            inner = inner * w[within]
        self.sum[(slice(None), *here)] += inner
        self._touched = bounding(self._touched, here)

    def aggregate_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        box = _intersection(tuple(region or tile.target), self.region)
        if box is None:
            return
        here = _shift(box, self.origin)
        self.sum[(slice(None), *here)] += constant_output(self.grid, tile, value, box, self.blend)
        self._touched = bounding(self._touched, here)

    def fill_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        parts = self._parts(tile, region)
        if parts is not None:
            _add_fill(self._fills, parts[0], value)

    def finalize(self) -> np.ndarray | None:
        if self._touched is not None:
            box = tuple(slice(a, b) for a, b in self._touched)
            image_box = tuple(slice(o + b.start, o + b.stop) for o, b in zip(self.origin, box, strict=True))
            normalize(self.sum[(slice(None), *box)], self.grid, self.blend, image_box)
        _fill(self.sum, self._fills)
        result, self.sum = self.sum, None
        if self.sink is not None:
            self.sink(self.region, result)
            return None
        return result


class BandMerger(Merger):
    """Out-of-core blending: slabs of ``slab`` planes along the first spatial axis, each written to
    ``sink`` as soon as it is complete (see the module docstring).

    The band is one ring buffer of ``ring`` planes (a multiple of ``slab``, at least ``slab - 1`` + the
    tile's inner depth): plane ``z`` of the image lives at ``z mod ring``. Tiles arrive in grid order, so
    the planes still open always fit in the ring, and a tile is added with one or two array operations
    whatever the slab thickness (a thin slab, e.g. one plane of 2048 × 2048 under a 32-plane tile, no longer
    means one operation per plane). A written slab's planes are zeroed and reused.

    ``done`` slabs (e.g. written by an interrupted run) are neither computed nor written again: tiles
    that only touch them are not needed. ``on_slab(k)`` is called after slab ``k`` was written (to record
    progress). ``sink`` gets a view of the ring, valid during the call. Peak memory is about ``channels ×
    ring × plane × 4`` bytes.

    ``background``: the value the sink's storage already holds where nothing was written (e.g. a new
    zarr store's fill value), or ``None``. With it, a slab is written only inside the bounding box of what
    differs from it (what was blended, and fills of another value), grown to whole ``chunks`` (the
    storage's chunk shape along the other spatial axes): around a sparse sample the rest of each plane
    is neither filled, written nor cleared, and a slab that is all background is not written at all.
    """

    def __init__(
        self,
        grid: TileGrid,
        channels: int,
        sink: Sink,
        slab: int,
        blend: str = "gaussian",
        done: Sequence[int] = (),
        on_slab: Callable[[int], None] | None = None,
        background: float | None = None,
        chunks: Sequence[int] | None = None,
    ):
        self.grid, self.channels, self.sink, self.blend = grid, channels, sink, blend
        self.background = None if background is None else np.float32(background)
        self.chunks = tuple(int(c) for c in chunks) if chunks is not None else None
        self.slab = max(1, int(slab))
        self.n_slabs = -(-grid.image_shape[0] // self.slab)
        self.done = set(int(k) for k in done)
        self.on_slab = on_slab
        self.written: list[int] = []
        depth = grid.inner[0]  # the deepest a tile's target reaches along the first axis
        self.ring = min(self.slab * -(-(self.slab - 1 + depth) // self.slab), self.n_slabs * self.slab)
        self._buffer: np.ndarray | None = None  # (C, ring, *rest), allocated on first use
        rest = len(grid.image_shape) - 1
        big = np.iinfo(np.int64).max
        self._lo = np.full((self.ring, rest), big, np.int64)  # per ring plane: box of what was blended
        self._hi = np.zeros((self.ring, rest), np.int64)
        self._fills: list[tuple[tuple[slice, ...], np.ndarray]] = []
        self._open: set[int] = set()  # slabs that received something and are not written yet

    def _slabs(self, tile: Tile) -> range:
        t = tile.target[0]
        return range(t.start // self.slab, (t.stop - 1) // self.slab + 1)

    def needs(self, tile: Tile) -> bool:
        return any(k not in self.done for k in self._slabs(tile))

    def _ring_parts(self, first: slice) -> list[tuple[slice, slice]]:
        """(ring planes, planes of the box) for a range of image planes: one part, or two at the wrap."""
        a, n = first.start % self.ring, first.stop - first.start
        if a + n <= self.ring:
            return [(slice(a, a + n), slice(0, n))]
        head = self.ring - a
        return [(slice(a, self.ring), slice(0, head)), (slice(0, n - head), slice(head, n))]

    def _add(self, box: tuple[slice, ...], data: np.ndarray) -> None:
        """Add (C, *box shape) ``data`` at the image ``box``."""
        self._opened(box)
        rest = box[1:]
        for ring, part in self._ring_parts(box[0]):
            self._buffer[(slice(None), ring, *rest)] += data[:, part]
            np.minimum(self._lo[ring], [r.start for r in rest], out=self._lo[ring])
            np.maximum(self._hi[ring], [r.stop for r in rest], out=self._hi[ring])

    def _opened(self, box: tuple[slice, ...]) -> None:
        """The slabs under ``box`` hold something now (the ring is allocated on first use)."""
        if self._buffer is None:
            self._buffer = np.zeros((self.channels, self.ring, *self.grid.image_shape[1:]), np.float32)
        self._open.update(range(box[0].start // self.slab, (box[0].stop - 1) // self.slab + 1))

    def _before(self, tile: Tile) -> None:
        """Write every open slab that ends at or before the tile (nothing earlier is touched again)."""
        position = tile.target[0].start
        for k in sorted(self._open):
            if (k + 1) * self.slab <= position:
                self._flush(k)

    def _flush(self, k: int) -> None:
        lo = k * self.slab
        hi = min(lo + self.slab, self.grid.image_shape[0])
        planes = slice(lo % self.ring, lo % self.ring + hi - lo)
        view = self._buffer[:, planes]
        region = (slice(lo, hi), *(slice(0, n) for n in self.grid.image_shape[1:]))
        touched = np.flatnonzero((self._hi[planes] > self._lo[planes]).all(axis=1))
        blended = None  # bounding box (rest axes) of what was blended in this slab
        if len(touched):
            blended = [
                slice(int(a), int(b))
                for a, b in zip(
                    self._lo[planes][touched].min(axis=0), self._hi[planes][touched].max(axis=0), strict=True
                )
            ]
        box = self._written_box(region, blended)  # what is written (and so modified) in the slab
        origin = [r.start for r in region]
        if k not in self.done and box is not None:
            if blended is not None:
                first = slice(int(touched[0]), int(touched[-1]) + 1)
                normalize(
                    view[(slice(None), first, *blended)],
                    self.grid,
                    self.blend,
                    (slice(lo + first.start, lo + first.stop), *blended),
                )
            fills = [(_intersection(b, box), value) for b, value in self._fills]
            _fill(view, [(_shift(b, origin), v) for b, v in fills if b is not None])
            self.sink(box, view[(slice(None), *_shift(box, origin))])
        if k not in self.done:
            self.done.add(k)
            self.written.append(k)
            if self.on_slab is not None:
                self.on_slab(k)
        if box is not None:  # all that was modified (the blended box lies inside it): zero for reuse
            view[(slice(None), *_shift(box, origin))] = 0
        self._lo[planes] = np.iinfo(np.int64).max
        self._hi[planes] = 0
        self._fills = [(b, v) for b, v in self._fills if b[0].stop > hi]
        self._open.discard(k)

    def _written_box(
        self, region: tuple[slice, ...], blended: list[slice] | None
    ) -> tuple[slice, ...] | None:
        """The part of a slab (``region``) to hand to the sink: all of it without a ``background``;
        else the box around ``blended`` and the fills of another value, grown to whole chunks (``None``
        when the slab is all background)."""
        if self.background is None:
            return region
        box = None if blended is None else bounding(None, blended)
        for b, value in self._fills:
            part = _intersection(b, region)
            if part is not None and not np.all(np.asarray(value, np.float32) == self.background):
                box = bounding(box, part[1:])
        if box is None:
            return None
        chunks = self.chunks or (1,) * len(box)
        grown = [
            slice(a // c * c, min(-(-b // c) * c, n))
            for (a, b), c, n in zip(box, chunks, self.grid.image_shape[1:], strict=True)
        ]
        return (region[0], *grown)

    def aggregate(self, tile: Tile, output: np.ndarray) -> None:
        self._before(tile)
        inner = output[(slice(None), *tile.crop)]
        w = self.grid.weights(tile, self.blend)
        if w is not None:
            inner = np.multiply(inner, w, out=inner) if inner.flags.writeable else inner * w
        self._add(tile.target, inner)

    def aggregate_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        self._before(tile)
        box = tuple(region or tile.target)
        self._add(box, constant_output(self.grid, tile, value, box, self.blend))

    def fill_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        self._before(tile)
        box = tuple(region or tile.target)
        _add_fill(self._fills, box, value)
        self._opened(box)

    def finalize(self) -> None:
        for k in sorted(self._open):
            self._flush(k)
        missing = [k for k in range(self.n_slabs) if k not in self.done]
        if missing:  # cannot happen for a grid that covers its image; a guard against silent holes
            raise RuntimeError(f"slabs {missing} received no tile")
        self._buffer = None
        return None


def choose_slab(
    image_shape: Sequence[int], inner: Sequence[int], channels: int, budget_bytes: int, largest: int = 64
) -> int:
    """The thickest slab (a power of two ≤ ``largest``, along the first spatial axis) whose band of
    ``slab + inner`` planes of float32 output fits in ``budget_bytes`` (at least 1)."""
    plane = int(np.prod(image_shape[1:])) * channels * 4
    slab = largest
    while slab > 1 and (slab + inner[0]) * plane > budget_bytes:
        slab //= 2
    return max(1, min(slab, int(image_shape[0])))
