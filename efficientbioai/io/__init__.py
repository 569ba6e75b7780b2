"""Reading and writing images.

- :mod:`~efficientbioai.io.read`: TIFF / OME-TIFF / ImageJ TIFF, NumPy and zarr / OME-Zarr, lazily; axes
  and pixel sizes.
- :mod:`~efficientbioai.io.layout`: an image as (C, *spatial) in the network's layout, lazily.
- :mod:`~efficientbioai.io.cache`: a cache of decoded chunks for tiles read from zarr inputs.
- :mod:`~efficientbioai.io.write`: whole images, atomically (a temporary sibling renamed into place).
- :mod:`~efficientbioai.io.chunked`: outputs written piece by piece, resumable (out-of-core, Dask).
- :mod:`~efficientbioai.io.files`: suffixes, output names, atomic replacement, leftovers of killed runs.
"""

from efficientbioai.io.cache import ChunkCache, bypassing, cached
from efficientbioai.io.chunked import PROGRESS_FILE, ChunkedOutput
from efficientbioai.io.files import (
    IMAGE_SUFFIXES,
    ZARR_METADATA,
    is_zarr_store,
    output_path,
    partial_outputs,
    remove_partials,
)
from efficientbioai.io.layout import LazyLayout, lazy_model_layout, to_model_layout
from efficientbioai.io.read import expand_paths, read_axes, read_image, read_pixel_size
from efficientbioai.io.write import create_zarr, write_image

__all__ = [
    "IMAGE_SUFFIXES",
    "PROGRESS_FILE",
    "ZARR_METADATA",
    "ChunkCache",
    "bypassing",
    "ChunkedOutput",
    "LazyLayout",
    "cached",
    "create_zarr",
    "expand_paths",
    "is_zarr_store",
    "lazy_model_layout",
    "output_path",
    "partial_outputs",
    "read_axes",
    "read_image",
    "read_pixel_size",
    "remove_partials",
    "to_model_layout",
    "write_image",
]
