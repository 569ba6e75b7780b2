"""Physical pixel sizes and their units: parsed from image metadata and turned into writer metadata.

A pixel size is a mapping ``{axis: (size, unit)}`` over the spatial axes ``"z"``, ``"y"``, ``"x"``
(those the file states), e.g. ``{"z": (2.0, "micrometer"), "y": (0.325, "micrometer"), ...}``. Units
are the OME-Zarr (UDUNITS-2) names: ``micrometer``, ``nanometer``, ``millimeter``, ...; ``None`` when
the file gives a size without a unit we know.

Sources, read by :func:`efficientbioai.io.read_pixel_size`: OME-XML ``Pixels`` ``PhysicalSizeX/Y/Z``
(+ ``...Unit``, default µm) in OME-TIFF; the ImageJ description (``unit``, ``spacing``) with the
``XResolution`` / ``YResolution`` tags; tifffile's shaped-TIFF JSON description (how this package writes
pixel sizes into TIFFs that are not ImageJ-compatible); plain TIFF resolution tags in centimetres or
inches; OME-Zarr ``multiscales`` scale transformations (of the first dataset, times the multiscale's
own) with the axes' units. Values that are not positive finite numbers are ignored, as is metadata that
cannot be parsed: there is then nothing to carry over. An OME-Zarr scale of 1 without a unit is what
writers put when they know nothing, so it counts as no information.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from efficientbioai.errors import EfficientBioAIError

PixelSize = dict[str, tuple[float, "str | None"]]

SPATIAL = "zyx"
# OME-Zarr (UDUNITS-2) length units -> metres
UNITS: dict[str, float] = {
    "angstrom": 1e-10,
    "attometer": 1e-18,
    "centimeter": 1e-2,
    "decimeter": 1e-1,
    "exameter": 1e18,
    "femtometer": 1e-15,
    "foot": 0.3048,
    "gigameter": 1e9,
    "hectometer": 1e2,
    "inch": 0.0254,
    "kilometer": 1e3,
    "megameter": 1e6,
    "meter": 1.0,
    "micrometer": 1e-6,
    "mile": 1609.344,
    "millimeter": 1e-3,
    "nanometer": 1e-9,
    "parsec": 3.0856775814913673e16,
    "petameter": 1e15,
    "picometer": 1e-12,
    "terameter": 1e12,
    "yard": 0.9144,
    "yoctometer": 1e-24,
    "yottameter": 1e24,
    "zeptometer": 1e-21,
    "zettameter": 1e21,
}
# OME-XML UnitsLength symbols for our units (those OME has)
OME_SYMBOLS: dict[str, str] = {
    "angstrom": "Å",
    "attometer": "am",
    "centimeter": "cm",
    "decimeter": "dm",
    "exameter": "Em",
    "femtometer": "fm",
    "foot": "ft",
    "gigameter": "Gm",
    "hectometer": "hm",
    "inch": "in",
    "kilometer": "km",
    "megameter": "Mm",
    "meter": "m",
    "micrometer": "µm",
    "mile": "mi",
    "millimeter": "mm",
    "nanometer": "nm",
    "parsec": "pc",
    "petameter": "Pm",
    "picometer": "pm",
    "terameter": "Tm",
    "yard": "yd",
    "yoctometer": "ym",
    "yottameter": "Ym",
    "zeptometer": "zm",
    "zettameter": "Zm",
}
# other spellings seen in OME-XML, ImageJ descriptions and hand-written metadata
_ALIASES = {
    **{symbol: name for name, symbol in OME_SYMBOLS.items()},
    "μm": "micrometer",  # Greek mu (U+03BC); OME uses the micro sign (U+00B5)
    "um": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "\\u00b5m": "micrometer",  # ImageJ's escaped micro sign
    "micrometre": "micrometer",
    "nanometre": "nanometer",
    "millimetre": "millimeter",
    "centimetre": "centimeter",
    "metre": "meter",
    "a": "angstrom",
    "inches": "inch",
}
# ImageJ writes one unit for all axes; Fiji's own spelling for the common ones
_IMAGEJ_UNITS = {
    "micrometer": "micron",
    "nanometer": "nm",
    "millimeter": "mm",
    "centimeter": "cm",
    "meter": "m",
}
_IMAGEJ_DTYPES = ("uint8", "uint16", "float32")
_TIFF_RESOLUTION_UNITS = {2: "inch", 3: "centimeter"}


def unit_name(unit: Any) -> str | None:
    """Our name (OME-Zarr's) for a unit spelled as OME, ImageJ or UDUNITS do; ``None`` when unknown."""
    if not isinstance(unit, str) or not unit.strip():
        return None
    text = unit.strip()
    if text in UNITS:
        return text
    return _ALIASES.get(text, _ALIASES.get(text.lower(), text.lower() if text.lower() in UNITS else None))


def _size(value: Any) -> float | None:
    try:
        size = float(value)
    except (TypeError, ValueError):
        return None
    return size if math.isfinite(size) and size > 0 else None


def convert(size: float, unit: str | None, to: str | None) -> float:
    """``size`` in ``unit`` expressed in ``to`` (unchanged when either is unknown)."""
    if unit is None or to is None or unit == to:
        return size
    return size * UNITS[unit] / UNITS[to]


# --------------------------------------------------------------------------------------------- reading


def from_ome_xml(xml: str) -> PixelSize:
    """``PhysicalSizeX/Y/Z`` of the first image in an OME-XML document."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    out: PixelSize = {}
    for axis in SPATIAL:
        size = _size(pixels.get(f"PhysicalSize{axis.upper()}"))
        if size is not None:
            out[axis] = (size, unit_name(pixels.get(f"PhysicalSize{axis.upper()}Unit", "µm")))
    return out


def _rational(value: Any) -> float | None:
    """1 / a TIFF resolution (pixels per unit) as a pixel size."""
    try:
        num, den = value
        return _size(den / num) if num else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def from_imagej(metadata: Mapping[str, Any] | None, x_resolution: Any, y_resolution: Any) -> PixelSize:
    """From an ImageJ description (``unit``, ``spacing``) and the X/Y resolution tags."""
    metadata = metadata or {}
    unit = unit_name(metadata.get("unit"))
    x, y, z = _rational(x_resolution), _rational(y_resolution), _size(metadata.get("spacing"))
    if unit is None and all(v in (None, 1.0) for v in (x, y, z)):
        return {}  # ImageJ's uncalibrated default: 1 pixel per pixel
    out: PixelSize = {}
    for axis, size in (("z", z), ("y", y), ("x", x)):
        if size is not None:
            out[axis] = (size, unit)
    return out


def from_shaped(metadata: Mapping[str, Any] | None) -> PixelSize:
    """From tifffile's shaped-TIFF JSON description, where :func:`tiff_options` writes OME-style keys."""
    out: PixelSize = {}
    for axis in SPATIAL:
        size = _size((metadata or {}).get(f"PhysicalSize{axis.upper()}"))
        if size is not None:
            out[axis] = (size, unit_name((metadata or {}).get(f"PhysicalSize{axis.upper()}Unit")))
    return out


def from_resolution_tags(x_resolution: Any, y_resolution: Any, resolution_unit: Any) -> PixelSize:
    """From plain TIFF resolution tags, when their unit is centimetres or inches."""
    try:
        unit = _TIFF_RESOLUTION_UNITS.get(int(resolution_unit))
    except (TypeError, ValueError):
        return {}
    if unit is None:
        return {}
    out: PixelSize = {}
    for axis, value in (("y", y_resolution), ("x", x_resolution)):
        size = _rational(value)
        if size is not None:
            out[axis] = (size, unit)
    return out


def from_multiscales(multiscale: Mapping[str, Any]) -> PixelSize:
    """From one OME-Zarr ``multiscales`` entry: the first dataset's scale (times the entry's own scale,
    if any) on the spatial axes, with the axes' units."""
    try:
        axes = multiscale.get("axes") or []
        names = [a.get("name") if isinstance(a, Mapping) else a for a in axes]
        units = [a.get("unit") if isinstance(a, Mapping) else None for a in axes]
        scale = [1.0] * len(names)
        for transforms in (
            multiscale["datasets"][0].get("coordinateTransformations") or [],
            multiscale.get("coordinateTransformations") or [],
        ):
            for t in transforms:
                if t.get("type") == "scale" and len(t.get("scale") or []) == len(names):
                    scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=True)]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return {}
    out: PixelSize = {}
    for name, unit, size in zip(names, units, scale, strict=True):
        name = str(name).lower()
        size = _size(size)
        if name in SPATIAL and size is not None and not (size == 1.0 and unit_name(unit) is None):
            out[name] = (size, unit_name(unit))
    return out


# --------------------------------------------------------------------------------------------- writing


def check_pixel_size(pixel_size: Mapping[str, Any] | None, where: str) -> PixelSize:
    """A validated copy of a pixel size given to a writer: ``{axis: (size, unit)}`` or ``{axis: size}``."""
    if not pixel_size:
        return {}
    fix = "give e.g. pixel_size={'y': (0.325, 'micrometer'), 'x': (0.325, 'micrometer')}"
    out: PixelSize = {}
    for axis, value in pixel_size.items():
        size, unit = (value, None) if not isinstance(value, (tuple, list)) else (tuple(value) + (None,))[:2]
        if str(axis).lower() not in SPATIAL:
            raise EfficientBioAIError(f"{where}: pixel size for unknown axis '{axis}'", fix)
        checked = _size(size)
        if checked is None:
            raise EfficientBioAIError(
                f"{where}: pixel size {size!r} for axis '{axis}' is not a positive number", fix
            )
        name = unit_name(unit)
        if unit is not None and name is None:
            raise EfficientBioAIError(
                f"{where}: unknown unit '{unit}' for axis '{axis}'",
                f"use one of {', '.join(sorted(UNITS))} (or OME symbols such as µm, nm)",
            )
        out[str(axis).lower()] = (checked, name)
    return out


def _imagej_compatible(axes: str | None, dtype: Any) -> bool:
    if not axes or not axes.endswith("yx"):
        return False
    order = "tzcyx"  # ImageJ hyperstacks are TZCYX
    return "".join(a for a in order if a in axes) == axes and str(dtype) in _IMAGEJ_DTYPES


def tiff_options(
    pixel_size: PixelSize, axes: str | None, dtype: Any, ome: bool, allow_imagej: bool = True
) -> dict[str, Any]:
    """Keyword arguments for ``tifffile.imwrite`` that record ``pixel_size`` (and ``axes``).

    OME-TIFF: OME-XML ``PhysicalSize*`` (+ units as OME symbols). Plain TIFF: an ImageJ hyperstack
    (``unit``, ``spacing`` and the X/Y resolution, as Fiji writes them) when the axes are in ImageJ's
    order (``[t][z][c]yx``) and the data type is uint8, uint16 or float32; otherwise tifffile's shaped
    TIFF with the sizes in its JSON description and X/Y resolution tags in centimetres.
    Without pixel sizes: the shaped (or OME) TIFF this package always wrote.
    """
    meta: dict[str, Any] = {"axes": axes.upper()} if axes else {}
    options: dict[str, Any] = {"imagej": False, "ome": ome, "metadata": meta}
    present = {a: v for a, v in pixel_size.items() if a in (axes or "yx")}
    if not present:
        return options
    if ome:
        for axis, (size, unit) in present.items():
            meta[f"PhysicalSize{axis.upper()}"] = size
            if unit is not None and unit in OME_SYMBOLS:
                meta[f"PhysicalSize{axis.upper()}Unit"] = OME_SYMBOLS[unit]
            elif unit is not None:  # no OME symbol: the size in µm
                meta[f"PhysicalSize{axis.upper()}"] = convert(size, unit, "micrometer")
        return options
    if allow_imagej and _imagej_compatible(axes, dtype):  # ImageJ files cannot be BigTIFF
        unit = next((u for _, u in (present.get(a, (0, None)) for a in "xyz") if u is not None), None)
        sizes = {a: convert(s, u, unit) for a, (s, u) in present.items()}
        ij: dict[str, Any] = {"axes": axes.upper()}
        if unit is not None:
            ij["unit"] = _IMAGEJ_UNITS.get(unit, OME_SYMBOLS.get(unit, unit))
        if "z" in sizes:
            ij["spacing"] = sizes["z"]
        options.update(imagej=True, metadata=ij)
        if "x" in sizes or "y" in sizes:
            options["resolution"] = (1 / sizes.get("x", 1.0), 1 / sizes.get("y", 1.0))
        return options
    for axis, (size, unit) in present.items():
        meta[f"PhysicalSize{axis.upper()}"] = size
        if unit is not None:
            meta[f"PhysicalSize{axis.upper()}Unit"] = unit
    x, y = present.get("x"), present.get("y")
    if x and y and x[1] in UNITS and y[1] in UNITS:
        options["resolution"] = (1 / convert(x[0], x[1], "centimeter"), 1 / convert(y[0], y[1], "centimeter"))
        options["resolutionunit"] = "CENTIMETER"
    return options


def ome_zarr_axes(axes: str, pixel_size: PixelSize) -> tuple[list[dict[str, str]], list[float]]:
    """OME-Zarr 0.4 ``axes`` (with units where known) and the ``scale`` of the full-resolution dataset."""
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    entries, scale = [], []
    for a in axes:
        entry = {"name": a, "type": kinds[a]}
        size, unit = pixel_size.get(a, (1.0, None))
        if unit is not None:
            entry["unit"] = unit
        entries.append(entry)
        scale.append(float(size))
    return entries, scale
