"""A read cache of decoded chunks for chunked, compressed inputs (zarr / OME-Zarr).

Sliding-window tiles overlap one another and rarely line up with the storage chunks: a 16×128×128 tile on
64×64×64 chunks decodes up to 18 chunks for the 262 k voxels it needs, and its neighbours decode most of
them again. :class:`ChunkCache` is a read-only view of such an array that keeps the most recently used
decoded chunks, up to a byte budget, so that the tiles of a row (and, when the budget holds a whole layer of
chunks, of the next layers) reuse them. Chunks are kept in the array's own dtype.

Large reads (over half the budget) go straight to the array and are not cached, so they do not push out
the chunks the tiles need; so do all reads inside :func:`bypassing` (e.g. the sample-localisation
pass, which reads the whole image once).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class ChunkCache:
    """Read-only ``array`` (``.shape``, ``.dtype``, ``.chunks``) with an LRU cache of decoded chunks of at
    most ``max_bytes``. Indexing with integers and step-1 slices is served from the cache; any other
    index is passed to the array. Not shared between threads (each Dask task opens its own)."""

    def __init__(self, array: Any, max_bytes: int):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.max_bytes = int(max_bytes)
        self._chunk_bytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self.decoded = 0  # chunks read from the array (for tests and benchmarks)
        self.bypass = False  # read straight from the array (see :func:`bypassing`)
        self.grown_from: int | None = None  # the budget before :meth:`fit` grew it

    def __repr__(self) -> str:
        return f"ChunkCache({self.array!r}, max_bytes={self.max_bytes})"

    def __array__(self, dtype=None, copy=None):
        data = np.asarray(self.array[...])
        return data.astype(dtype) if dtype is not None else data

    def __getitem__(self, key):
        box, squeeze = (None, ()) if self.bypass else self._box(key)
        if box is None:
            return self.array[key]
        ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(box, self.chunks, strict=True)]
        count = int(np.prod([len(r) for r in ranges]))
        if count == 0 or count * self._chunk_bytes * 2 > self.max_bytes:
            return self.array[key]
        out = np.empty([s.stop - s.start for s in box], self.dtype)
        missing = []
        for idx in itertools.product(*ranges):  # the cached ones become the newest: none is evicted now
            if idx in self._cache:
                self._cache.move_to_end(idx)
            else:
                missing.append(idx)
        self._fetch(missing)
        for idx in itertools.product(*ranges):
            chunk = self._cache[idx]
            lo = [i * c for i, c in zip(idx, self.chunks, strict=True)]
            part = tuple(
                slice(max(s.start, o), min(s.stop, o + n))
                for s, o, n in zip(box, lo, chunk.shape, strict=True)
            )
            out[tuple(slice(p.start - s.start, p.stop - s.start) for p, s in zip(part, box, strict=True))] = (
                chunk[tuple(slice(p.start - o, p.stop - o) for p, o in zip(part, lo, strict=True))]
            )
        return out[squeeze] if squeeze else out

    def fit(self, read_shape: Sequence[int]) -> None:
        """Grow the budget, if needed, to twice the decoded chunks under one read of ``read_shape`` (per
        axis of the array) placed anywhere: so that such reads (the tiles) are always cached. Large
        chunks need it, e.g. whole 2048 × 2048 planes under a 16-plane tile are 16 chunks, 256 MB of
        float32, and without the cache every tile would decode all of them again. :attr:`grown_from`
        keeps the budget it had before."""
        need = 2 * chunk_bytes_under(self.chunks, self.shape, self.dtype.itemsize, read_shape)
        if need > self.max_bytes:
            if self.grown_from is None:
                self.grown_from = self.max_bytes
            self.max_bytes = need

    def _box(self, key) -> tuple[tuple[slice, ...] | None, tuple]:
        """The requested box as step-1 slices, and the index that drops the integer-indexed axes; or
        (None, ()) for an index this cache does not serve."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key) or len(key) > self.ndim:
            return None, ()
        key = key + (slice(None),) * (self.ndim - len(key))
        box, squeeze = [], []
        for k, n in zip(key, self.shape, strict=True):
            if isinstance(k, (int, np.integer)):
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    return None, ()  # let the array raise its own IndexError
                box.append(slice(i, i + 1))
                squeeze.append(0)
            elif isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    return None, ()
                box.append(slice(start, max(start, stop)))
                squeeze.append(slice(None))
            else:
                return None, ()
        return tuple(box), (tuple(squeeze) if 0 in squeeze else ())

    def _fetch(self, missing: list[tuple[int, ...]]) -> None:
        """Decode the ``missing`` chunks: one read of their bounding box (tiles moving along a row miss
        one column of chunks at a time), split into chunks."""
        if not missing:
            return
        first = [min(m[d] for m in missing) for d in range(self.ndim)]
        last = [max(m[d] for m in missing) for d in range(self.ndim)]
        region = tuple(
            slice(a * c, min((b + 1) * c, n))
            for a, b, c, n in zip(first, last, self.chunks, self.shape, strict=True)
        )
        block = np.asarray(self.array[region])
        wanted = set(missing)
        for idx in itertools.product(*(range(a, b + 1) for a, b in zip(first, last, strict=True))):
            if idx not in wanted:
                continue
            local = tuple(
                slice((i - a) * c, (i - a + 1) * c) for i, a, c in zip(idx, first, self.chunks, strict=True)
            )
            self._store(idx, block[local].copy())
            self.decoded += 1

    def _store(self, idx: tuple[int, ...], chunk: np.ndarray) -> None:
        self._cache[idx] = chunk
        self._bytes += chunk.nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes


def chunk_bytes_under(
    chunks: Sequence[int], shape: Sequence[int], itemsize: int, read_shape: Sequence[int]
) -> int:
    """Bytes of the decoded chunks a read of ``read_shape`` touches at worst (straddling chunk edges on
    every axis where it can)."""
    count = 1
    for c, n, r in zip(chunks, shape, read_shape, strict=True):
        r = max(1, min(int(r), int(n)))
        count *= min(-(-int(n) // int(c)), -(-(r - 1) // int(c)) + 1)
    return count * int(np.prod(chunks)) * int(itemsize)


@contextlib.contextmanager
def bypassing(image: Any) -> Iterator[None]:
    """Within the block, reads of ``image`` skip the :class:`ChunkCache` under it, if any (found through
    the ``.array`` of views such as :class:`~efficientbioai.io.layout.LazyLayout`): a pass over the whole
    image decodes each chunk once anyway, and caching it would only copy it and push out the chunks that
    the tiles need next."""
    cache, seen = image, 0
    while cache is not None and not isinstance(cache, ChunkCache) and seen < 8:
        cache, seen = getattr(cache, "array", None), seen + 1
    if not isinstance(cache, ChunkCache):
        yield
        return
    before, cache.bypass = cache.bypass, True
    try:
        yield
    finally:
        cache.bypass = before


def cached(array: Any, max_bytes: int) -> Any:
    """``array`` behind a :class:`ChunkCache` when it is a chunked store whose reads decode chunks (a zarr
    array) and ``max_bytes`` is positive; else ``array`` itself (NumPy arrays and memory maps are cached
    by the operating system)."""
    if max_bytes <= 0 or isinstance(array, np.ndarray):
        return array
    chunks = getattr(array, "chunks", None)
    if not (isinstance(chunks, tuple) and len(chunks) == len(array.shape)):
        return array
    if not all(isinstance(c, (int, np.integer)) for c in chunks):
        return array
    return ChunkCache(array, max_bytes)


__all__ = ["ChunkCache", "bypassing", "cached", "chunk_bytes_under"]
