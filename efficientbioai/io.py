"""Reading images from disk: TIFF / OME-TIFF (memory-mapped where possible) and NumPy ``.npy``."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from efficientbioai.errors import EfficientBioAIError

IMAGE_SUFFIXES = (".tif", ".tiff", ".npy")


def expand_paths(spec: str | Path, what: str = "images") -> list[Path]:
    """Files named by ``spec``: a file, a folder (its images, sorted) or a glob pattern."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise EfficientBioAIError(
            f"{what}: nothing found at '{spec}'",
            f"give a file, a folder or a glob such as 'data/*.tif' (relative paths are read from the "
            f"current directory, {Path.cwd()})",
        )
    return files


def read_image(path: str | Path) -> np.ndarray:
    """Read one image as an array (memory-mapped when the file allows it)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise EfficientBioAIError(f"image not found: {path}", "check the path")
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


def to_model_layout(
    image: np.ndarray, image_axes: str | None, model_axes: str, source: str = "image"
) -> np.ndarray:
    """Rearrange an image into the model's layout without the batch axis: (C, [Z,] Y, X).

    ``image_axes`` names the image's axes (e.g. ``"zyx"``, ``"cyx"``, ``"yxc"``); when ``None`` it is
    inferred: as many dimensions as the model has spatial axes means one channel, one more means channel
    first.
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
        or set(image_axes) - set("bczyx")
        or len(set(image_axes)) != len(image_axes)
    ):
        raise EfficientBioAIError(
            f"{source}: axes '{image_axes}' do not describe an array of shape {tuple(image.shape)}",
            "name one axis per dimension using the letters b, c, z, y, x",
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
