"""What produced an output, recorded in the output itself, so that it is never mistaken for another's.

Every image ``infer`` writes carries a provenance record (a JSON object: the artifact's checksum, the
engine, the input file and the settings that change values): in a TIFF as a private tag
(:data:`TIFF_TAG`, ASCII JSON; ImageJ / OME descriptions stay as they are), in a zarr / OME-Zarr store as
the group attribute :data:`ATTR`. A later run skips an existing output only when its record matches
what it would write (:func:`efficientbioai.infer.provenance.check_existing`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.errors import EfficientBioAIError

TIFF_TAG = 65000  # in the private range (65000-65535) of the TIFF specification
ATTR = "efficientbioai"


def tiff_extratags(record: dict[str, Any] | None) -> list[tuple]:
    """tifffile ``extratags`` holding ``record`` (none for ``None``)."""
    if record is None:
        return []
    return [(TIFF_TAG, "s", 0, json.dumps(record, sort_keys=True), True)]


def set_zarr_attr(store: Path, record: dict[str, Any] | None) -> None:
    """Record ``record`` in the attributes of the zarr group at ``store``."""
    if record is None:
        return
    import zarr

    zarr.open_group(store=str(store), mode="r+").attrs[ATTR] = json.loads(json.dumps(record))


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile's warnings about a damaged file become the message of :class:`UnreadableOutput`."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


class UnreadableOutput(EfficientBioAIError):
    """An existing output that cannot be opened (corrupt, half-written by another program)."""


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The provenance record of an existing output (``None``: it has none, e.g. written by another
    program or an older efficientbioai); :class:`UnreadableOutput` when the file cannot be read."""
    path = Path(path)
    fix = f"set overwrite: true (or pass --overwrite) to compute {path.name} again"
    try:
        if path.is_dir():
            import zarr

            group = zarr.open_group(store=str(path), mode="r")
            value = dict(group.attrs).get(ATTR)
            zarr.open_array(store=str(path), path="0", mode="r")  # the image itself opens
        else:
            import tifffile

            size = path.stat().st_size
            with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
                tag = tif.pages[0].tags.get(TIFF_TAG)
                value = tag.value if tag is not None else None
                series = tif.series[0]
                pages = int(np.prod(series.shape)) // max(1, int(np.prod(tif.pages[0].shape)))
                if len(tif.pages) < pages:
                    raise ValueError(f"it holds {len(tif.pages)} of its {pages} pages")
                last = tif.pages[len(tif.pages) - 1]
                for page in {0: tif.pages[0], 1: last}.values():  # a truncated file ends before its data
                    ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True)]
                    if ends and max(ends) > size:
                        raise ValueError(f"the file ends at byte {size}, its image data at {max(ends)}")
            value = json.loads(value) if isinstance(value, str) else value
    except Exception as exc:
        raise UnreadableOutput(
            f"the existing output {path} cannot be read ({type(exc).__name__}: {exc}): it may be corrupt "
            "or half-written",
            fix,
        ) from exc
    return value if isinstance(value, dict) else None
