"""Reading and writing images.

Reading: TIFF / OME-TIFF / ImageJ TIFF (memory-mapped where possible), NumPy ``.npy`` (memory-mapped)
and zarr / OME-Zarr stores (opened lazily: the returned ``zarr.Array`` is only read where it is sliced).

Writing (:func:`write_image`) is atomic: the data go to a hidden temporary sibling
(``.<name>.partial-<random>``) that is renamed into place only once complete, so an interrupted run never
leaves a file or store that looks finished. :func:`partial_outputs` lists the leftovers of runs that were
killed before they could clean up, :func:`remove_partials` deletes them.

Zarr output is written in the zarr **v2** format as an OME-Zarr 0.4 image (a group holding the
full-resolution array at path ``"0"``, Blosc/zstd compressed, ``/`` chunk separator): v2 is the format
that both zarr-python 2 and 3 (the project allows ``zarr>=2.16``) and the common OME-Zarr viewers read.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from efficientbioai.errors import EfficientBioAIError

if TYPE_CHECKING:  # pragma: no cover
    import zarr

IMAGE_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")

# Files that mark a folder as a zarr store (v2 array / group / attributes, v3 node).
ZARR_METADATA = (".zarray", ".zgroup", "zarr.json", ".zattrs")
# Suffixes :func:`output_path` strips from an input name, longest first.
_STEM_SUFFIXES = (".ome.tiff", ".ome.zarr", ".ome.tif", ".tiff", ".zarr", ".tif", ".npy")
_FORMATS = {"tif": "tiff", "tiff": "tiff", "zarr": "zarr", "npy": "npy"}
_SUFFIX_FORMATS = {".tif": "tiff", ".tiff": "tiff", ".zarr": "zarr", ".npy": "npy"}
# Axis letters written into files and returned by read_axes: time, channel, z, y, x.
_WRITE_AXES = "tczyx"
# tifffile axis codes -> ours. 'S' (samples, e.g. RGB) is a channel axis. Codes that are missing here
# ('Q' unknown, 'I' generic page sequence, 'R', 'E', ...) make read_axes return None: we cannot tell
# what they are, and the caller then infers the layout from the number of dimensions.
_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
_TOKEN_CHARS = 16
_PARTIAL_RE = re.compile(rf"^\..+\.(partial|replaced)-[0-9a-f]{{{_TOKEN_CHARS}}}$")


# ----------------------------------------------------------------------------------------------- reading


def is_zarr_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a zarr store (named ``*.zarr`` or containing zarr metadata)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return path.suffix.lower() == ".zarr" or any((path / name).is_file() for name in ZARR_METADATA)


def _is_listed_image(path: Path) -> bool:
    """Whether a folder entry counts as an image when the folder is given as the images."""
    if path.name.startswith("."):  # hidden files: temporaries of write_image, macOS '._x.tif' forks
        return False
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return path.is_dir()
    return suffix in IMAGE_SUFFIXES and path.is_file()


def expand_paths(spec: str | Path, what: str = "images") -> list[Path]:
    """Images named by ``spec``: a file, a zarr store, a folder (its images, sorted) or a glob pattern.

    A zarr store (a folder named ``*.zarr`` or holding zarr metadata) is one image, never a folder of
    images. In a folder, ``.tif``, ``.tiff`` and ``.npy`` files and ``*.zarr`` stores are listed; hidden
    entries are skipped. A glob keeps the files and zarr stores it matches.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if is_zarr_store(path):
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_listed_image(p))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(
            Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file() or is_zarr_store(p)
        )
    if not files:
        raise EfficientBioAIError(
            f"{what}: nothing found at '{spec}'",
            f"give a file, a zarr store, a folder or a glob such as 'data/*.tif' or 'data/*.zarr' "
            f"(relative paths are read from the current directory, {Path.cwd()})",
        )
    return files


def read_image(path: str | Path) -> np.ndarray | zarr.Array:
    """Read one image as an array.

    TIFF and ``.npy`` files are memory-mapped when the file allows it. A zarr store is opened lazily and
    returned as a ``zarr.Array`` (slice it to read; ``np.asarray`` loads it whole): for an OME-Zarr image
    the full-resolution array of the first multiscale, for a group holding a single array that array.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        if is_zarr_store(path):
            return _open_zarr_image(path)
        raise EfficientBioAIError(
            f"{path} is a folder, not an image",
            "give an image file or a zarr store (a folder ending in .zarr); where a list of images is "
            "expected, a folder stands for all the images in it",
        )
    if not path.is_file():
        raise EfficientBioAIError(f"image not found: {path}", "check the path")
    if suffix == ".zarr":
        raise EfficientBioAIError(
            f"{path} is a file, but zarr stores are folders (zipped or other single-file stores are not "
            "supported)",
            "unzip it into a folder named like the file, or convert it to TIFF",
        )
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            try:
                return tifffile.memmap(path, mode="r")
            except Exception:  # compressed or tiled TIFFs cannot be memory-mapped
                return tifffile.imread(path)
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise EfficientBioAIError(
            f"could not read {path} as a {suffix} image ({type(exc).__name__}: {exc})",
            "check that the file is a valid image of that type and not truncated",
        ) from exc
    raise EfficientBioAIError(
        f"unsupported image format '{suffix}' for {path}",
        f"convert it to one of {', '.join(IMAGE_SUFFIXES)}",
    )


def read_axes(path: str | Path) -> str | None:
    """The axes of the array :func:`read_image` returns for ``path``, lower case (e.g. ``"czyx"``).

    Read from OME-Zarr ``multiscales`` axes, zarr v3 ``dimension_names`` or the xarray-style
    ``_ARRAY_DIMENSIONS`` attribute, and from OME-TIFF / ImageJ / tifffile-shaped TIFF metadata
    (``'S'`` samples count as the channel axis). The result only uses the letters ``t, c, z, y, x``: it is
    ``None`` when the file does not say, when an axis is of a kind we cannot name (tifffile's ``'Q'``
    unknown or ``'I'`` page sequence, OME custom axes) or when two axes would get the same letter. Size-1
    axes are kept (``"tczyx"`` for a 5D OME-Zarr); :func:`to_model_layout` drops them.
    """
    path = Path(path)
    if path.is_dir() and is_zarr_store(path):
        _, axes = _open_zarr_node(path)
        return axes
    image = read_image(path)  # consistent errors for missing / unsupported / unreadable files
    suffix = path.suffix.lower()
    if suffix not in (".tif", ".tiff"):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            codes, shape = series.axes, tuple(series.shape)
    except Exception as exc:
        raise EfficientBioAIError(
            f"could not read the axes of {path} ({type(exc).__name__}: {exc})",
            "check that the file is a valid TIFF and not truncated",
        ) from exc
    if shape != tuple(image.shape):
        return None
    return _checked_axes(_TIFF_AXES.get(code.upper(), "?") for code in codes)


def read_pixel_size(path: str | Path) -> dict[str, tuple[float, str | None]]:
    """Physical pixel sizes of the image at ``path``: ``{axis: (size, unit)}`` for the spatial axes the
    metadata states (``"z"``, ``"y"``, ``"x"``), units as OME-Zarr names (``"micrometer"``; ``None`` when
    not given or unknown); ``{}`` when the file says nothing (``.npy``, plain zarr arrays, uncalibrated
    TIFFs). Read from OME-XML in OME-TIFF, else the ImageJ description and resolution tags, else
    tifffile's shaped-TIFF description, else resolution tags in cm / inches; and from OME-Zarr
    ``multiscales`` (scale transformations of the full-resolution dataset, axes units). See
    :mod:`efficientbioai.pixel_size`.
    """
    from efficientbioai import pixel_size as ps

    path = Path(path)
    if path.is_dir() and is_zarr_store(path):
        multiscale = _zarr_multiscale(path)
        return ps.from_multiscales(multiscale) if multiscale else {}
    read_image(path)  # consistent errors for missing / unsupported / unreadable files
    if path.suffix.lower() not in (".tif", ".tiff"):
        return {}
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            tags = {
                name: page.tags[name].value
                for name in ("XResolution", "YResolution", "ResolutionUnit")
                if name in page.tags
            }
            if tif.is_ome:
                found = ps.from_ome_xml(tif.ome_metadata or "")
                if found:
                    return found
            if tif.is_imagej:
                return ps.from_imagej(tif.imagej_metadata, tags.get("XResolution"), tags.get("YResolution"))
            if tif.is_shaped:
                found = ps.from_shaped((tif.shaped_metadata or [{}])[0])
                if found:
                    return found
    except Exception as exc:
        raise EfficientBioAIError(
            f"could not read the metadata of {path} ({type(exc).__name__}: {exc})",
            "check that the file is a valid TIFF and not truncated",
        ) from exc
    return ps.from_resolution_tags(
        tags.get("XResolution"), tags.get("YResolution"), tags.get("ResolutionUnit")
    )


def _zarr_multiscale(path: Path) -> dict | None:
    """The first OME-Zarr ``multiscales`` entry of the store at ``path`` (series 0 of a bioformats2raw
    layout), or ``None``."""
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
        for _ in range(2):
            if isinstance(node, zarr.Array):
                return None
            attrs = dict(node.attrs)
            ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else {}
            multiscales = attrs.get("multiscales") or ome.get("multiscales")
            if multiscales and isinstance(multiscales[0], dict):
                return multiscales[0]
            if "bioformats2raw.layout" not in attrs or "0" not in node:
                return None
            node = node["0"]
    except Exception:  # unreadable metadata: nothing to carry over (read_image reports broken stores)
        return None
    return None


def _checked_axes(names: Any) -> str | None:
    """Join axis names into a string of distinct letters from ``tczyx``, or ``None``."""
    letters = []
    for name in names:
        name = str(name).lower()
        if len(name) != 1 or name not in _WRITE_AXES:
            return None
        letters.append(name)
    axes = "".join(letters)
    return axes if axes and len(set(axes)) == len(axes) else None


def _open_zarr_image(path: Path) -> zarr.Array:
    array, _ = _open_zarr_node(path)
    return array


def _open_zarr_node(path: Path) -> tuple[zarr.Array, str | None]:
    """The image array of the zarr store at ``path`` and its axes (``None`` when not recorded)."""
    try:
        import zarr

        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:
        raise EfficientBioAIError(
            f"could not open {path} as a zarr store ({type(exc).__name__}: {exc})",
            "check that the folder is a complete zarr store (it needs .zarray/.zgroup or zarr.json "
            "metadata); an interrupted copy or write leaves it incomplete",
        ) from exc
    return _image_in_node(node, path, depth=0)


def _image_in_node(node: Any, path: Path, depth: int) -> tuple[zarr.Array, str | None]:
    import zarr

    if isinstance(node, zarr.Array):
        return node, _zarr_array_axes(node)
    attrs = dict(node.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else {}
    multiscales = attrs.get("multiscales") or ome.get("multiscales")
    where = f"{path}" if depth == 0 else f"{path} (group '{node.path}')"
    if multiscales:
        try:
            first = multiscales[0]
            dataset = first["datasets"][0]["path"]
            array = node[dataset]
        except Exception as exc:
            raise EfficientBioAIError(
                f"{where}: OME-Zarr multiscales metadata does not lead to an array "
                f"({type(exc).__name__}: {exc})",
                "check the 'multiscales' datasets paths in the metadata (.zattrs or zarr.json), or point "
                "to the array folder inside the store",
            ) from exc
        if not isinstance(array, zarr.Array):
            raise EfficientBioAIError(
                f"{where}: OME-Zarr dataset '{dataset}' is a group, not an array",
                "point to the array folder inside the store",
            )
        names = [a.get("name") if isinstance(a, dict) else a for a in first.get("axes") or []]
        axes = _checked_axes(names) if len(names) == array.ndim else None
        return array, axes or _zarr_array_axes(array)
    if "bioformats2raw.layout" in attrs and depth == 0 and "0" in node:  # series 0 of a converted file
        return _image_in_node(node["0"], path, depth + 1)
    arrays = [name for name, _ in node.arrays()]
    if len(arrays) == 1:
        array = node[arrays[0]]
        return array, _zarr_array_axes(array)
    found = f"holds {len(arrays)} arrays ({', '.join(sorted(arrays)[:5])})" if arrays else "holds no array"
    raise EfficientBioAIError(
        f"{where}: zarr group {found} and no OME-Zarr multiscales metadata, so it is unclear which one is "
        "the image",
        f"point to one array inside it, e.g. {path / sorted(arrays)[0]}"
        if arrays
        else "point to the store's image array, or write the image as OME-Zarr",
    )


def _zarr_array_axes(array: Any) -> str | None:
    names = getattr(getattr(array, "metadata", None), "dimension_names", None)  # zarr v3 arrays
    if not names or any(n is None for n in names):
        names = dict(array.attrs).get("_ARRAY_DIMENSIONS")  # xarray convention for zarr v2
    if not names or len(names) != array.ndim:
        return None
    return _checked_axes(names)


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


# ----------------------------------------------------------------------------------------------- writing


def output_path(input_path: str | Path, output_dir: str | Path, fmt: str) -> Path:
    """Where the result for ``input_path`` goes: ``<output_dir>/<input stem><.tif|.ome.tif|.zarr>``.

    The stem is the input name without ``.ome.tif``, ``.ome.tiff``, ``.ome.zarr``, ``.tif``, ``.tiff``,
    ``.zarr`` or ``.npy`` (matched case-insensitively; other names are kept whole). ``fmt`` is ``"tiff"``
    (or ``"tif"``) or ``"zarr"``; a TIFF result of an OME-TIFF input is an OME-TIFF (``.ome.tif``).
    Refuses a destination that is the input itself.
    """
    kind = _FORMATS.get(str(fmt).lower())
    if kind not in ("tiff", "zarr"):
        raise EfficientBioAIError(
            f"unknown output format '{fmt}'",
            "use 'tiff' (one .tif file per image) or 'zarr' (one .zarr store per image)",
        )
    stem = _stem(Path(input_path).name)
    suffix = ".zarr" if kind == "zarr" else ".ome.tif" if _is_ome_tiff(Path(input_path)) else ".tif"
    out = Path(output_dir).expanduser() / (stem + suffix)
    if out.resolve() == Path(input_path).expanduser().resolve():
        raise EfficientBioAIError(
            f"the output for {input_path} would overwrite the input itself ({out})",
            "choose an output folder other than the input folder, or another output format",
        )
    return out


def write_image(
    path: str | Path,
    array: Any,
    *,
    fmt: str | None = None,
    axes: str | None = None,
    chunks: Sequence[int] | None = None,
    pixel_size: dict[str, Any] | None = None,
) -> Path:
    """Write ``array`` to ``path`` atomically and return ``path``.

    The format comes from the suffix (``.tif``/``.tiff`` TIFF, ``.zarr`` zarr store, ``.npy`` NumPy), or
    from ``fmt`` (``"tiff"``, ``"zarr"``, ``"npy"``) for other names. ``axes`` (letters from ``tczyx``,
    one per dimension, e.g. ``"czyx"``) is recorded in the file: tifffile's shaped-TIFF metadata (or OME
    metadata for ``*.ome.tif``) and, for zarr, OME-Zarr 0.4 multiscales axes when the order is one
    OME-Zarr allows (``[t][c][z]yx``) plus the ``_ARRAY_DIMENSIONS`` attribute. ``chunks`` (zarr only)
    defaults to 64 along z, y and x for images with a z axis and 512 along y and x without, whole
    channels and one time point per chunk (axes are inferred from the number of dimensions when not
    given: ``yx``, ``zyx``, ``czyx``, ``tczyx``). Zarr data are copied slab by slab, so a lazy source
    (memory map, zarr array) is never loaded whole.

    ``pixel_size`` (``{axis: (size, unit)}`` or ``{axis: size}`` for ``z``, ``y``, ``x``, as
    :func:`read_pixel_size` returns) is recorded for the axes the file has (with ``axes=None``, ``y`` and
    ``x`` are the last two dimensions): OME-Zarr scale and axes units (zarr needs ``axes`` in OME order
    for that), OME-XML ``PhysicalSize*`` for ``*.ome.tif``, and for a plain TIFF an ImageJ hyperstack
    description when the axes and data type allow it, else resolution tags plus the shaped description
    (:func:`efficientbioai.pixel_size.tiff_options`).

    The data are written to ``.<name>.partial-<random>`` next to ``path`` (parent folders are created)
    and renamed over ``path`` once complete; an existing zarr store at ``path`` is moved aside, replaced
    and then deleted. On any error the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path).expanduser()
    kind = _output_format(path, fmt)
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
    shape = tuple(int(n) for n in array.shape)
    if len(shape) < 2:
        raise EfficientBioAIError(
            f"{path}: cannot write an array of shape {shape} as an image",
            "give an array with at least two dimensions (y, x)",
        )
    if axes is not None:
        axes = axes.lower()
        if len(axes) != len(shape) or set(axes) - set(_WRITE_AXES) or len(set(axes)) != len(axes):
            raise EfficientBioAIError(
                f"{path}: axes '{axes}' do not describe an array of shape {shape}",
                "name one axis per dimension using the letters t, c, z, y, x (e.g. 'czyx')",
            )
    if kind == "tiff" and axes is not None and _is_ome_tiff(path) and not axes.endswith("yx"):
        raise EfficientBioAIError(
            f"{path}: OME-TIFF needs y and x as the last axes, got '{axes}'",
            "move the y and x axes last (e.g. 'czyx'), or write a plain .tif",
        )
    chunk_shape = _zarr_chunks(shape, axes, chunks, path) if kind == "zarr" else None
    from efficientbioai.pixel_size import check_pixel_size

    sizes = check_pixel_size(pixel_size, str(path))
    _check_replaceable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EfficientBioAIError(
            f"could not create the folder {path.parent} ({type(exc).__name__}: {exc})",
            "check the output path and that you may write there",
        ) from exc
    tmp = path.with_name(f".{path.name[:200]}.partial-{secrets.token_hex(_TOKEN_CHARS // 2)}")
    try:
        if kind == "tiff":
            _write_tiff(tmp, array, axes, ome=_is_ome_tiff(path), pixel_size=sizes)
        elif kind == "zarr":
            _write_zarr(tmp, array, axes, chunk_shape, name=_stem(path.name), pixel_size=sizes)
        else:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(array), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        _move_into_place(tmp, path)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, EfficientBioAIError) or not isinstance(exc, Exception):
            raise
        raise EfficientBioAIError(
            f"could not write {path} ({type(exc).__name__}: {exc})",
            f"check the free disk space and that you may write in {path.parent}; {path} was left as it was",
        ) from exc
    return path


# ------------------------------------------------------------------------------ writing region by region

PROGRESS_FILE = "efficientbioai-progress.json"
# pages larger than this many pixels are written to TIFF as 256 × 256 tiles, not whole
_TIFF_TILED_PAGE = 1 << 24


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
        self.kind = _output_format(self.path, fmt)
        if self.kind not in ("zarr", "tiff"):
            raise EfficientBioAIError(
                f"{self.path}: out-of-core outputs are written as zarr or TIFF, not {self.kind}",
                "use a .zarr or .tif output",
            )
        self.shape = tuple(int(n) for n in shape)
        self.axes = axes.lower() if axes else None
        self.metadata = metadata  # room for more (e.g. pixel sizes): recorded where the format allows
        self.chunks = _zarr_chunks(self.shape, self.axes, chunks, self.path)
        _check_replaceable(self.path)
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
        token = hashlib.sha256(key.encode()).hexdigest()[:_TOKEN_CHARS]
        self.fingerprint = token
        self.store = self.path.with_name(f".{self.path.name[:200]}.partial-{token}")
        self._progress_path = self.store / PROGRESS_FILE
        self._done: dict[str, list[int]] = {}
        self.resumed = False
        if self.store.is_dir() and self._progress_path.is_file():
            try:
                record = json.loads(self._progress_path.read_text())
                import zarr

                self.array = zarr.open_array(store=str(self.store), path="0", mode="r+")
                if record.get("fingerprint") == token and tuple(self.array.shape) == self.shape:
                    self._done = {str(k): list(v) for k, v in record.get("done", {}).items()}
                    self.resumed = True
            except Exception:  # unreadable leftovers: start again
                self.resumed = False
        if not self.resumed:
            _remove(self.store)
            self.array = _create_zarr(
                self.store,
                self.shape,
                np.dtype(dtype),
                self.axes,
                self.chunks,
                _stem(self.path.name),
                self.metadata.get("pixel_size"),
            )
            self._save()

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
        try:
            if self.kind == "zarr":
                self._progress_path.unlink(missing_ok=True)
                _move_into_place(self.store, self.path)
            else:
                tmp = self.path.with_name(
                    f".{self.path.name[:200]}.partial-{secrets.token_hex(_TOKEN_CHARS // 2)}"
                )
                try:
                    _write_tiff_from(
                        tmp,
                        self.array,
                        self.axes,
                        ome=_is_ome_tiff(self.path),
                        pixel_size=self.metadata.get("pixel_size"),
                    )
                    _move_into_place(tmp, self.path)
                except BaseException:
                    _remove(tmp)
                    raise
                _remove(self.store)
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
        _remove(self.store)


def _write_tiff_from(
    tmp: Path, array: Any, axes: str | None, ome: bool, pixel_size: dict | None = None
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
        **options,
    )
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())


def partial_outputs(output_dir: str | Path) -> list[Path]:
    """Leftovers of interrupted :func:`write_image` calls in ``output_dir`` (not its subfolders), sorted.

    These are temporaries (``.<name>.partial-<random>``) and outputs that were being replaced
    (``.<name>.replaced-<random>``); none of them is a finished output.
    """
    folder = Path(output_dir).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _PARTIAL_RE.match(p.name))


def remove_partials(output_dir: str | Path) -> list[Path]:
    """Delete :func:`partial_outputs` of ``output_dir`` and return what was removed.

    Only call this when no other process is writing into ``output_dir``: its temporaries would go too.
    """
    removed = partial_outputs(output_dir)
    for leftover in removed:
        _remove(leftover)
    return removed


def _output_format(path: Path, fmt: str | None) -> str:
    from_suffix = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        if from_suffix is None:
            raise EfficientBioAIError(
                f"cannot tell the image format to write from the name {path}",
                "end the name in .tif, .tiff, .zarr or .npy, or pass the format",
            )
        return from_suffix
    kind = _FORMATS.get(fmt.lower())
    if kind is None:
        raise EfficientBioAIError(f"unknown image format '{fmt}' for {path}", "use 'tiff', 'zarr' or 'npy'")
    if from_suffix is not None and from_suffix != kind:
        raise EfficientBioAIError(
            f"{path}: the name ends in '{path.suffix}' but the format asked for is '{fmt}'",
            "make the suffix match the format, or leave the format out to take it from the suffix",
        )
    return kind


def _is_ome_tiff(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


def _stem(name: str) -> str:
    for suffix in _STEM_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _zarr_chunks(
    shape: tuple[int, ...], axes: str | None, chunks: Sequence[int] | None, path: Path
) -> tuple[int, ...]:
    if chunks is not None:
        chunks = tuple(chunks)
        if len(chunks) != len(shape) or not all(isinstance(c, (int, np.integer)) and c > 0 for c in chunks):
            raise EfficientBioAIError(
                f"{path}: chunks {chunks} do not fit an array of shape {shape}",
                "give one positive chunk size per dimension",
            )
        return tuple(int(min(c, max(n, 1))) for c, n in zip(chunks, shape, strict=True))
    if axes is None:
        axes = "tczyx"[-len(shape) :] if len(shape) <= 5 else "?" * (len(shape) - 5) + "tczyx"
    edge = 64 if "z" in axes else 512
    sizes = {"z": edge, "y": edge, "x": edge}
    out = []
    for axis, n in zip(axes, shape, strict=True):
        size = n if axis == "c" else sizes.get(axis, 1)
        out.append(max(1, min(size, n)))
    return tuple(out)


def _write_tiff(tmp: Path, array: Any, axes: str | None, ome: bool, pixel_size: dict | None = None) -> None:
    import tifffile

    from efficientbioai.pixel_size import tiff_options

    options = tiff_options(pixel_size or {}, axes, array.dtype, ome)
    tifffile.imwrite(tmp, np.asarray(array), photometric="minisblack", **options)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())


def _zarr_format_kwargs() -> dict[str, Any]:
    import zarr

    return {"zarr_format": 2} if int(zarr.__version__.split(".")[0]) >= 3 else {}


def _create_zarr(
    tmp: Path,
    shape: tuple[int, ...],
    dtype: Any,
    axes: str | None,
    chunks: tuple[int, ...] | None,
    name: str,
    pixel_size: dict | None = None,
):
    """An empty OME-Zarr 0.4 image (zarr v2 format) at ``tmp``; returns its full-resolution array."""
    import zarr
    from numcodecs import Blosc

    from efficientbioai.pixel_size import ome_zarr_axes

    fmt = _zarr_format_kwargs()
    group = zarr.open_group(store=str(tmp), mode="w", **fmt)
    target = zarr.open_array(
        store=str(tmp),
        path="0",
        mode="w",
        shape=tuple(shape),
        chunks=chunks,
        dtype=dtype,
        compressor=Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
        dimension_separator="/",
        **fmt,
    )
    if axes is not None:
        target.attrs["_ARRAY_DIMENSIONS"] = list(axes)
        if _is_ome_order(axes):
            entries, scale = ome_zarr_axes(axes, pixel_size or {})
            group.attrs["multiscales"] = [
                {
                    "version": "0.4",
                    "name": name,
                    "axes": entries,
                    "datasets": [
                        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                    ],
                }
            ]
    return target


def _write_zarr(
    tmp: Path,
    array: Any,
    axes: str | None,
    chunks: tuple[int, ...] | None,
    name: str,
    pixel_size: dict | None = None,
) -> None:
    target = _create_zarr(tmp, tuple(array.shape), array.dtype, axes, chunks, name, pixel_size)
    step = chunks[0] if chunks else array.shape[0]
    for start in range(0, array.shape[0], step):  # slab by slab: a lazy source is never loaded whole
        target[start : start + step] = np.asarray(array[start : start + step])


def _is_ome_order(axes: str) -> bool:
    """Whether OME-Zarr 0.4 allows these axes: optional t, optional c, optional z, then y, x."""
    return axes.endswith("yx") and "".join(a for a in _WRITE_AXES if a in axes) == axes


def _check_replaceable(path: Path) -> None:
    """Refuse to replace a folder that is not a zarr store: it may hold the user's own files."""
    if path.is_dir() and not path.is_symlink():
        holds_zarr = any((path / name).is_file() for name in ZARR_METADATA)
        if not holds_zarr and any(path.iterdir()):
            raise EfficientBioAIError(
                f"{path} is an existing folder that is not a zarr store; refusing to replace it",
                "choose another output folder or name, or move that folder away",
            )


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not tmp.is_dir() and not (dest.is_dir() and not dest.is_symlink()):
        os.replace(tmp, dest)  # a file over a file (or nothing): atomic
        return
    # Folders cannot be renamed over a non-empty folder: move the old one aside, move the new one in,
    # then delete the old one (restoring it if the move in fails).
    _check_replaceable(dest)
    aside = None
    if os.path.lexists(dest):
        aside = dest.with_name(f".{dest.name[:200]}.replaced-{secrets.token_hex(_TOKEN_CHARS // 2)}")
        os.replace(dest, aside)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if aside is not None:
            os.replace(aside, dest)
        raise
    if aside is not None:
        _remove(aside)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
