"""Image panels for the HTML report: input / original output / compressed output / difference.

2D images are shown whole, 3D volumes as one z slice (the middle one unless configured); multi-channel
images show their first channel. Large images are reduced by block averaging to at most ``size`` pixels
on their longest side. Original and compressed outputs share one display range (from the original's
percentiles), and every difference map shares one symmetric range, so that panels compare by eye.
PNG data is embedded base64 (no external files).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from efficientbioai.benchmark.config import PanelsConfig
    from efficientbioai.benchmark.images import ImageEntry

# blue - white - red, for signed differences
_DIVERGING = np.array(
    [
        [33, 102, 172],
        [103, 169, 207],
        [209, 229, 240],
        [247, 247, 247],
        [253, 219, 199],
        [239, 138, 98],
        [178, 24, 43],
    ],
    np.float32,
)


def to_slice(x: np.ndarray, ndim: int, z: int | None = None) -> tuple[np.ndarray, int | None]:
    """(C, *spatial) → a 2D array: the first channel, and for 3D the z slice ``z`` (default: the middle)."""
    x = np.asarray(x)
    if x.ndim == ndim + 1:
        x = x[0]
    if ndim == 3:
        zi = x.shape[0] // 2 if z is None else int(np.clip(z, 0, x.shape[0] - 1))
        return np.asarray(x[zi], np.float32), zi
    return np.asarray(x, np.float32), None


def reduce(x: np.ndarray, size: int) -> np.ndarray:
    """Block-average ``x`` so that its longest side is at most ``size``."""
    f = int(np.ceil(max(x.shape) / size))
    if f <= 1:
        return x
    h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    if h == 0 or w == 0:
        return x[::f, ::f]
    return x[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def display_range(x: np.ndarray) -> tuple[float, float]:
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.8])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def gray(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def diverging(d: np.ndarray, limit: float) -> np.ndarray:
    t = np.clip(d / limit, -1, 1) if limit > 0 else np.zeros_like(d)
    pos = (t + 1) / 2 * (len(_DIVERGING) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(_DIVERGING) - 2)
    f = (pos - i)[..., None]
    rgb = _DIVERGING[i] * (1 - f) + _DIVERGING[i + 1] * f
    return rgb.astype(np.uint8)


def png_data_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class Panel:
    title: str
    uri: str
    caption: str
    width: int
    height: int


@dataclass
class PanelRow:
    variant: str
    panels: list[Panel]


def image_panels(
    image: np.ndarray,
    original: np.ndarray,
    variants: dict[str, np.ndarray],
    ndim: int,
    size: int = 320,
    z: int | None = None,
) -> tuple[str, Panel, Panel, list[PanelRow]]:
    """(slice description, input panel, original panel, a row [output, difference] per variant).

    ``image`` is (C, *spatial), outputs (C_out, *spatial), ``ndim`` the number of spatial axes.
    """
    inp, zi = to_slice(image, ndim, z)
    orig, _ = to_slice(original, ndim, zi)
    where = f"z slice {zi} of {np.asarray(image).shape[1]}" if zi is not None else "whole image"
    inp_r = reduce(inp, size)
    lo, hi = display_range(inp_r)
    input_panel = Panel(
        "input", png_data_uri(gray(inp_r, lo, hi)), f"{lo:.3g} … {hi:.3g}", *inp_r.shape[::-1]
    )
    orig_r = reduce(orig, size)
    olo, ohi = display_range(orig_r)
    original_panel = Panel(
        "original output", png_data_uri(gray(orig_r, olo, ohi)), f"{olo:.3g} … {ohi:.3g}", *orig_r.shape[::-1]
    )
    diffs = {}
    for name, out in variants.items():
        sl, _ = to_slice(out, ndim, zi)
        diffs[name] = (sl, sl - orig)
    limit = max([float(np.percentile(np.abs(d), 99.9)) for _, d in diffs.values()] + [1e-12])
    rows = []
    for name, (sl, d) in diffs.items():
        sl_r = reduce(sl, size)
        d_full_max = float(np.abs(d).max())
        d_r = reduce(d, size)
        rows.append(
            PanelRow(
                name,
                [
                    Panel(
                        f"{name} output",
                        png_data_uri(gray(sl_r, olo, ohi)),
                        f"same range as the original ({olo:.3g} … {ohi:.3g})",
                        *sl_r.shape[::-1],
                    ),
                    Panel(
                        f"difference ({name} − original)",
                        png_data_uri(diverging(d_r, limit)),
                        f"blue −{limit:.2g} … red +{limit:.2g}; max |diff| {d_full_max:.3g}",
                        *d_r.shape[::-1],
                    ),
                ],
            )
        )
    return where, input_panel, original_panel, rows


def build_panels(
    report: dict[str, Any], out: Path, images: list[ImageEntry], panels: PanelsConfig
) -> list[dict[str, Any]]:
    """Panels for the first images, per device: input / original / each variant / difference, from the
    rows' outputs saved under ``out``/outputs."""
    from efficientbioai.benchmark.images import load_image

    if not panels.enabled or not report["model"]["axes"]:
        return []
    axes = report["model"]["axes"]
    ndim = len(axes) - 2
    sets = []
    for device in report["settings"]["devices"]:
        ok = [r for r in report["rows"] if r["device"] == device and r["status"] == "ok"]
        orig = next((r for r in ok if r["variant"] is None), None)
        if orig is None:
            continue
        for im in images[: panels.max_images]:
            image = load_image(im.spec(), axes)
            original = np.load(out / "outputs" / orig["id"] / f"{im.name}.npy")
            variants = {
                r["id"]: np.load(out / "outputs" / r["id"] / f"{im.name}.npy") for r in ok if r["variant"]
            }
            if not variants:
                continue
            where, inp, origp, prow = image_panels(
                image, original, variants, ndim, size=panels.size, z=panels.slice
            )
            sets.append(
                {
                    "image": im.name,
                    "device": device,
                    "where": where,
                    "input": inp,
                    "original": origp,
                    "rows": prow,
                }
            )
    return sets
