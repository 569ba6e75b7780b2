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
- :class:`BandMerger`: out-of-core. The output is cut into slabs along the slowest spatial axis; a slab is
  a :class:`RegionMerger` that is opened when the first tile reaches it and written to a ``sink`` (e.g. a
  zarr array on disk) as soon as no later tile can touch it. Tiles arrive in grid order, so at most
  ``slab + inner tile size`` planes of output are held in memory, whatever the size of the image.

Every merger adds the same tile contributions in the same order and normalises with the same per-axis
inverse weights (:func:`~efficientbioai.tiling.normalize`), so their results are identical to the bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

from efficientbioai.tiling import Blender, Tile, TileGrid, bounding, normalize

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
        self._fills.append((tuple(region or tile.target), value))

    def finalize(self) -> np.ndarray:
        out = self._blender.result()
        _fill(out, self._fills)
        return out


def _fill(out: np.ndarray, fills: Sequence[tuple[tuple[slice, ...], np.ndarray]]) -> None:
    """Write each (region, per-channel value) into the (C, *spatial) ``out``."""
    for region, value in fills:
        view = out[(slice(None), *region)]
        view[...] = np.asarray(value, np.float32).reshape(-1, *[1] * (view.ndim - 1))


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
        parts = self._parts(tile, region)
        if parts is None:
            return
        here, within = parts
        w = self.grid.weights(tile, self.blend)
        shape = tuple(s.stop - s.start for s in within)
        w = np.ones(shape, np.float32) if w is None else w[within]
        self.sum[(slice(None), *here)] += np.asarray(value, np.float32).reshape(-1, *[1] * len(shape)) * w
        self._touched = bounding(self._touched, here)

    def fill_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        parts = self._parts(tile, region)
        if parts is not None:
            self._fills.append((parts[0], value))

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

    ``done`` slabs (e.g. written by an interrupted run) are neither computed nor written again: tiles
    that only touch them are not needed. ``on_slab(k)`` is called after slab ``k`` was written (to record
    progress). Peak memory is about ``channels × (slab + inner tile size) × plane × 4`` bytes.
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
    ):
        self.grid, self.channels, self.sink, self.blend = grid, channels, sink, blend
        self.slab = max(1, int(slab))
        self.n_slabs = -(-grid.image_shape[0] // self.slab)
        self.done = set(int(k) for k in done)
        self.on_slab = on_slab
        self.open: dict[int, RegionMerger] = {}
        self.written: list[int] = []

    def slab_region(self, k: int) -> tuple[slice, ...]:
        lo = k * self.slab
        first = slice(lo, min(lo + self.slab, self.grid.image_shape[0]))
        return (first, *(slice(0, s) for s in self.grid.image_shape[1:]))

    def _slabs(self, tile: Tile) -> range:
        t = tile.target[0]
        return range(t.start // self.slab, (t.stop - 1) // self.slab + 1)

    def needs(self, tile: Tile) -> bool:
        return any(k not in self.done for k in self._slabs(tile))

    def _flush_before(self, position: int) -> None:
        """Write every open slab that ends at or before ``position`` along the first axis."""
        for k in sorted(self.open):
            if (k + 1) * self.slab <= position:
                self._write(k)

    def _write(self, k: int) -> None:
        self.open.pop(k).finalize()
        self.done.add(k)
        self.written.append(k)
        if self.on_slab is not None:
            self.on_slab(k)

    def _mergers(self, tile: Tile) -> list[RegionMerger]:
        self._flush_before(tile.target[0].start)  # tiles come in grid order: nothing earlier is touched
        out = []
        for k in self._slabs(tile):
            if k in self.done:
                continue
            if k not in self.open:
                self.open[k] = RegionMerger(
                    self.grid, self.channels, self.slab_region(k), self.blend, sink=self.sink
                )
            out.append(self.open[k])
        return out

    def aggregate(self, tile: Tile, output: np.ndarray) -> None:
        for m in self._mergers(tile):
            m.aggregate(tile, output)

    def aggregate_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        for m in self._mergers(tile):
            m.aggregate_constant(tile, value, region)

    def fill_constant(self, tile: Tile, value: np.ndarray, region: Box | None = None) -> None:
        for m in self._mergers(tile):
            m.fill_constant(tile, value, region)

    def finalize(self) -> None:
        for k in sorted(self.open):
            self._write(k)
        missing = [k for k in range(self.n_slabs) if k not in self.done]
        if missing:  # cannot happen for a grid that covers its image; a guard against silent holes
            raise RuntimeError(f"slabs {missing} received no tile")
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
