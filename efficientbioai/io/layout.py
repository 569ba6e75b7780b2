"""An image in the network's layout, (C, *spatial): in memory, or lazily (a view that reads only the
region it is sliced with)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from efficientbioai.errors import EfficientBioAIError

if TYPE_CHECKING:  # pragma: no cover
    import zarr


def to_model_layout(
    image: np.ndarray | zarr.Array, image_axes: str | None, model_axes: str, source: str = "image"
) -> np.ndarray:
    """Rearrange an image into the model's layout without the batch axis: (C, [Z,] Y, X).

    ``image_axes`` names the image's axes (e.g. ``"zyx"``, ``"cyx"``, ``"yxc"``, ``"tczyx"``); when
    ``None`` it is inferred: as many dimensions as the model has spatial axes means one channel, one more
    means channel first. Size-1 axes the model does not have (``b``, ``t``, and ``z`` for a 2D model) are
    dropped. The image may be a NumPy array, a memory map or a zarr array (loaded here).
    """
    spatial = model_axes.replace("b", "").replace("c", "")
    if image_axes is None:
        if image.ndim == len(spatial):
            image_axes = spatial
        elif image.ndim == len(spatial) + 1:
            image_axes = "c" + spatial
        else:
            raise EfficientBioAIError(
                f"{source}: has shape {tuple(image.shape)} but the model takes {len(spatial)}D images "
                f"(axes '{model_axes}')",
                "set the image axes in the config (e.g. axes: czyx) or give images with the model's "
                "number of spatial dimensions",
            )
    image_axes = image_axes.lower()
    if (
        len(image_axes) != image.ndim
        or set(image_axes) - set("btczyx")
        or len(set(image_axes)) != len(image_axes)
    ):
        raise EfficientBioAIError(
            f"{source}: axes '{image_axes}' do not describe an array of shape {tuple(image.shape)}",
            "name one axis per dimension using the letters b, t, c, z, y, x",
        )
    arr = np.asarray(image)
    axes = image_axes
    if "b" in axes:
        if arr.shape[axes.index("b")] != 1:
            raise EfficientBioAIError(
                f"{source}: has a batch axis of size {arr.shape[axes.index('b')]}",
                "store one image per file",
            )
        arr = arr.take(0, axis=axes.index("b"))
        axes = axes.replace("b", "")
    if "t" in axes:
        if arr.shape[axes.index("t")] != 1:
            raise EfficientBioAIError(
                f"{source}: has {arr.shape[axes.index('t')]} time points (axis t)",
                "store one time point per file",
            )
        arr = arr.take(0, axis=axes.index("t"))
        axes = axes.replace("t", "")
    if "z" in axes and "z" not in spatial and arr.shape[axes.index("z")] == 1:
        arr = arr.take(0, axis=axes.index("z"))  # a single plane stored as 3D, for a 2D model
        axes = axes.replace("z", "")
    if "c" not in axes:
        arr = arr[np.newaxis]
        axes = "c" + axes
    missing = set(spatial) - set(axes)
    extra = set(axes) - set(spatial) - {"c"}
    if missing or extra:
        raise EfficientBioAIError(
            f"{source}: axes '{image_axes}' do not match the model's spatial axes '{spatial}'",
            "give images with the model's spatial axes, or set the image axes in the config",
        )
    return np.transpose(arr, [axes.index(a) for a in "c" + spatial])


class LazyLayout:
    """A lazily-read (C, *spatial) view of an array whose axes only need size-1 axes dropped and/or a
    channel axis added (no transposition): slicing it reads only the sliced part of the array."""

    def __init__(self, array: Any, index: tuple, add_channel: bool):
        self.array, self._index, self._add_channel = array, index, add_channel
        kept = [n for n, i in zip(array.shape, index, strict=True) if isinstance(i, slice)]
        self.shape = ((1,) if add_channel else ()) + tuple(int(n) for n in kept)
        self.ndim = len(self.shape)
        self.dtype = array.dtype

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        if self._add_channel:
            channel, key = key[0], key[1:]
        it = iter(key)
        full = tuple(next(it) if isinstance(i, slice) else i for i in self._index)
        data = np.asarray(self.array[full])
        return data[np.newaxis][channel] if self._add_channel else data

    def __array__(self, dtype=None, copy=None):
        data = self[(slice(None),) * self.ndim]
        return data.astype(dtype) if dtype is not None else data

    def array_read_shape(self, spatial: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """The shape read from :attr:`array` (per axis of it) by a read of this view of every channel and
        ``spatial`` (one size per spatial axis): one index of each dropped axis, all channels."""
        sizes = iter(int(n) for n in spatial)
        kept = [i for i, k in enumerate(self._index) if isinstance(k, slice)]
        read = [1] * len(self.array.shape)
        for j, i in enumerate(kept):  # without an added channel axis the first kept axis is the channels
            read[i] = self.array.shape[i] if j == 0 and not self._add_channel else next(sizes)
        return tuple(read)


def lazy_model_layout(image: Any, image_axes: str | None, model_axes: str, source: str = "image") -> Any:
    """Like :func:`to_model_layout`, but a lazily-read image (zarr array, memory map) whose axes are
    already in the model's order up to size-1 axes (``t``, ``b``, ``z`` of a 2D model) and a missing
    channel axis is returned as a :class:`LazyLayout` view, never loaded whole (e.g. an OME-Zarr ``tczyx``
    level 0). Other images are rearranged (and loaded) by :func:`to_model_layout`."""
    spatial = model_axes.replace("b", "").replace("c", "")
    if isinstance(image, np.ndarray) and not isinstance(image, np.memmap):
        return to_model_layout(image, image_axes, model_axes, source)
    axes = image_axes.lower() if image_axes else None
    if axes is None:
        axes = (
            spatial
            if image.ndim == len(spatial)
            else "c" + spatial
            if image.ndim == len(spatial) + 1
            else None
        )
    if axes is not None and len(axes) == image.ndim:
        index, kept = [], ""
        for a, n in zip(axes, image.shape, strict=True):
            if a in spatial or a == "c":
                index.append(slice(None))
                kept += a
            elif n == 1:
                index.append(0)
            else:
                index = None
                break
        if index is not None and kept.replace("c", "") == spatial and kept in (spatial, "c" + spatial):
            return LazyLayout(image, tuple(index), add_channel="c" not in kept)
    return to_model_layout(image, image_axes, model_axes, source)
