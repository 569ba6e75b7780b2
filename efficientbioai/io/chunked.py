"""Outputs written piece by piece (out-of-core and Dask inference): :class:`ChunkedOutput`."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.errors import EfficientBioAIError
from efficientbioai.io.files import (
    TOKEN_CHARS,
    check_replaceable,
    is_ome_tiff,
    move_into_place,
    name_stem,
    output_format,
    remove_path,
)
from efficientbioai.io.provenance import set_zarr_attr, tiff_extratags
from efficientbioai.io.write import create_zarr, zarr_chunks

PROGRESS_FILE = "efficientbioai-progress.json"


# pages larger than this many pixels are written to TIFF as 256 × 256 tiles, not whole
_TIFF_TILED_PAGE = 1 << 24


_IN_PROGRESS: dict[Path, Path] = {}  # temporary store → the output it becomes (this process's)


def in_progress() -> list[tuple[Path, Path]]:
    """(temporary store, output) of every :class:`ChunkedOutput` of this process that is neither committed
    nor discarded but holds data: what an interrupted run leaves for the next one to resume."""
    return [(s, p) for s, p in _IN_PROGRESS.items() if s.is_dir()]


class ChunkedOutput:
    """An output image written region by region (out of core), atomically and resumably.

    The data go into a zarr store under a temporary name, ``.<name>.partial-<token>``, where ``token``
    is derived from ``fingerprint`` (what determines the result: input, artifact, settings). Regions are
    written to :attr:`array` by the caller, who records finished units of work with :meth:`mark` (kept in
    a small progress file inside the store). A later run with the same fingerprint finds the store and
    :meth:`done` tells it what not to compute again; a different fingerprint starts afresh.

    :meth:`commit` makes the output visible: a zarr output is renamed into place; a TIFF output is written
    from the store as a BigTIFF page by page (or tile by tile for large 2D pages) to its own temporary
    and renamed into place, and the store is deleted. Until then nothing at ``path`` looks finished.
    """

    def __init__(
        self,
        path: str | Path,
        shape: Sequence[int],
        dtype: Any = np.float32,
        *,
        axes: str | None = None,
        chunks: Sequence[int] | None = None,
        fingerprint: str = "",
        fmt: str | None = None,
        **metadata: Any,
    ):
        import hashlib
        import json

        self.path = Path(path).expanduser()
        self.kind = output_format(self.path, fmt)
        if self.kind not in ("zarr", "tiff"):
            raise EfficientBioAIError(
                f"{self.path}: out-of-core outputs are written as zarr or TIFF, not {self.kind}",
                "use a .zarr or .tif output",
            )
        self.shape = tuple(int(n) for n in shape)
        self.axes = axes.lower() if axes else None
        self.metadata = metadata  # room for more (e.g. pixel sizes): recorded where the format allows
        self.chunks = zarr_chunks(self.shape, self.axes, chunks, self.path)
        check_replaceable(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EfficientBioAIError(
                f"could not create the folder {self.path.parent} ({type(exc).__name__}: {exc})",
                "check the output path and that you may write there",
            ) from exc
        key = json.dumps(
            [fingerprint, self.shape, str(np.dtype(dtype)), self.axes, self.chunks], sort_keys=True
        )
        token = hashlib.sha256(key.encode()).hexdigest()[:TOKEN_CHARS]
        self.fingerprint = token
        self.store = self.path.with_name(f".{self.path.name[:200]}.partial-{token}")
        self._progress_path = self.store / PROGRESS_FILE
        self._done: dict[str, list[int]] = {}
        self._array = None
        self.resumed = False
        if self.store.is_dir() and self._progress_path.is_file():
            try:
                record = json.loads(self._progress_path.read_text())
                import zarr

                self._array = zarr.open_array(store=str(self.store), path="0", mode="r+")
                if record.get("fingerprint") == token and tuple(self._array.shape) == self.shape:
                    self._done = {str(k): list(v) for k, v in record.get("done", {}).items()}
                    self.resumed = True
                    _IN_PROGRESS[self.store] = self.path
            except Exception:  # unreadable leftovers: start again
                self.resumed = False
        self.dtype = np.dtype(dtype)
        if not self.resumed:
            remove_path(self.store)  # leftovers of another run; the new store is made on first use
            self._array = None

    @property
    def array(self):
        """The zarr array being written (created on first use: see :meth:`create`)."""
        return self.create()

    def create(self, fill_value: float = 0.0):
        """The zarr array, created now if this run did not resume one. ``fill_value`` is what chunks that
        are never written hold: zarr skips writing a chunk that equals it (e.g. the background value of
        skipped tiles). A resumed store keeps its own (its unwritten chunks already mean that)."""
        if self._array is None:
            self._array = create_zarr(
                self.store,
                self.shape,
                self.dtype,
                self.axes,
                self.chunks,
                name_stem(self.path.name),
                self.metadata.get("pixel_size"),
                fill_value=fill_value,
            )
            set_zarr_attr(self.store, self.metadata.get("provenance"))
            self._save()
            _IN_PROGRESS[self.store] = self.path
        return self._array

    def finished_count(self) -> int:
        """How many units (slabs, blocks) are recorded as written, over all keys."""
        return sum(map(len, self._done.values()))

    def done(self, key: Any = 0) -> set[int]:
        """Units of work recorded as finished under ``key`` (e.g. the sample index)."""
        return set(self._done.get(str(key), []))

    def mark(self, key: Any, unit: int) -> None:
        """Record that ``unit`` (e.g. a slab or block number) of ``key`` is written."""
        self._done.setdefault(str(key), []).append(int(unit))
        self._save()

    def _save(self) -> None:
        import json

        tmp = self._progress_path.with_name(PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self._done}))
        os.replace(tmp, self._progress_path)

    def commit(self) -> Path:
        """Make the finished output visible at :attr:`path` (see the class docstring)."""
        _IN_PROGRESS.pop(self.store, None)
        try:
            if self.kind == "zarr":
                self._progress_path.unlink(missing_ok=True)
                move_into_place(self.store, self.path)
            else:
                tmp = self.path.with_name(
                    f".{self.path.name[:200]}.partial-{secrets.token_hex(TOKEN_CHARS // 2)}"
                )
                try:
                    _write_tiff_from(
                        tmp,
                        self.array,
                        self.axes,
                        ome=is_ome_tiff(self.path),
                        pixel_size=self.metadata.get("pixel_size"),
                        provenance=self.metadata.get("provenance"),
                    )
                    move_into_place(tmp, self.path)
                except BaseException:
                    remove_path(tmp)
                    raise
                remove_path(self.store)
        except EfficientBioAIError:
            raise
        except Exception as exc:
            raise EfficientBioAIError(
                f"could not write {self.path} ({type(exc).__name__}: {exc})",
                f"check the free disk space and that you may write in {self.path.parent}",
            ) from exc
        return self.path

    def discard(self) -> None:
        """Delete the temporary store (nothing is resumed later)."""
        _IN_PROGRESS.pop(self.store, None)
        remove_path(self.store)


def _write_tiff_from(
    tmp: Path,
    array: Any,
    axes: str | None,
    ome: bool,
    pixel_size: dict | None = None,
    provenance: dict | None = None,
) -> None:
    """Write a lazily-read array (e.g. zarr) as a BigTIFF: 2D pages (the last two axes) in C order, read
    a chunk-thick slab at a time; pages over ``_TIFF_TILED_PAGE`` pixels as 256 × 256 tiles."""
    import tifffile

    from efficientbioai.pixel_size import tiff_options

    shape = tuple(int(n) for n in array.shape)
    dtype = np.dtype(array.dtype)
    options = tiff_options(pixel_size or {}, axes, dtype, ome, allow_imagej=False)
    tiled = shape[-1] * shape[-2] > _TIFF_TILED_PAGE
    lead = shape[:-2]

    def pages():
        if not lead:
            yield np.asarray(array[...])
            return
        outer = lead[:-1]
        depth = lead[-1]
        step = max(1, int(getattr(array, "chunks", (1,) * len(shape))[len(lead) - 1]))
        for idx in np.ndindex(*outer) if outer else [()]:
            for z0 in range(0, depth, step):
                slab = np.asarray(array[(*idx, slice(z0, z0 + step))])
                yield from slab

    def tiles():
        ty, tx = 256, 256
        for idx in np.ndindex(*lead) if lead else [()]:
            for y0 in range(0, shape[-2], ty):
                for x0 in range(0, shape[-1], tx):
                    yield np.asarray(array[(*idx, slice(y0, y0 + ty), slice(x0, x0 + tx))])

    tifffile.imwrite(
        tmp,
        data=tiles() if tiled else pages(),
        shape=shape,
        dtype=dtype,
        bigtiff=True,
        photometric="minisblack",
        tile=(256, 256) if tiled else None,
        extratags=tiff_extratags(provenance),
        **options,
    )
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
