"""Reading images: TIFF / OME-TIFF / ImageJ TIFF (memory-mapped where possible), NumPy ``.npy``
(memory-mapped) and zarr / OME-Zarr stores (opened lazily: the returned ``zarr.Array`` is only read where
it is sliced); their axes and pixel sizes."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from efficientbioai.errors import EfficientBioAIError
from efficientbioai.io.files import IMAGE_SUFFIXES, WRITE_AXES, is_zarr_store

if TYPE_CHECKING:  # pragma: no cover
    import zarr


# tifffile axis codes -> ours. 'S' (samples, e.g. RGB) is a channel axis. Codes that are missing here
# ('Q' unknown, 'I' generic page sequence, 'R', 'E', ...) make read_axes return None: we cannot tell
# what they are, and the caller then infers the layout from the number of dimensions.
_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}


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
        if len(name) != 1 or name not in WRITE_AXES:
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
