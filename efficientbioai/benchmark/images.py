"""The benchmark's folder and images: the output folder, the image list (with generated images written
first), the default calibration images, and one image loaded in the model's layout."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.benchmark.config import BenchmarkConfig, GenerateConfig
from efficientbioai.errors import ConfigError

MARKER = ".efficientbioai-benchmark"


@dataclass
class ImageEntry:
    name: str  # unique, names the output files
    path: Path
    axes: str | None
    sample: int = 0
    target: Path | None = None
    generated: bool = False
    shape: tuple[int, ...] = ()  # (C, *spatial) in the model's layout

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "axes": self.axes, "sample": self.sample}


def prepare_output(output: Path, overwrite: bool) -> Path:
    """The benchmark folder ``output``, created or emptied; only a benchmark folder is replaced."""
    out = output.expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"output: {output} exists and is not a folder", "choose another output")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise ConfigError(
                    f"output: {output} exists and is not a benchmark folder (no {MARKER})",
                    "choose a new or empty folder; a benchmark folder is only replaced with overwrite",
                )
            if not overwrite:
                raise ConfigError(
                    f"output: {output} already holds a benchmark",
                    "choose another output folder, or set overwrite: true (or pass --overwrite) to replace it",
                )
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `efficientbioai benchmark`; replaced by --overwrite\n")
    return out


def resolve_images(cfg: BenchmarkConfig, out: Path) -> list[ImageEntry]:
    """The benchmark images in config order: generated ones are written under OUTPUT/data first."""
    from efficientbioai.benchmark.data import write_generated
    from efficientbioai.io import expand_paths, read_axes, read_image

    entries: list[ImageEntry] = []
    paths = iter(cfg.source_paths())
    for source in cfg.images:
        if isinstance(source, GenerateConfig):
            written = write_generated(source, cfg.task, out / "data" / "images", out / "data" / "targets")
            entries += [ImageEntry(p.stem, p, None, 0, t, True) for p, t in written]
            continue
        source = next(paths)
        files = expand_paths(source.path, "images")
        targets: list[Path | None] = [None] * len(files)
        if source.targets:
            targets = list(expand_paths(source.targets, "targets"))
            if len(targets) != len(files):
                raise ConfigError(
                    f"targets: {len(targets)} target file(s) for {len(files)} image(s) in '{source.path}'",
                    "give one target per image, in the same (sorted) order",
                )
        for f, t in zip(files, targets, strict=True):
            axes = source.axes or read_axes(f)
            n = 1
            if axes and "b" in axes.lower():
                n = int(read_image(f).shape[axes.lower().index("b")])
            stem = f.name.split(".")[0]
            for k in range(n):
                entries.append(ImageEntry(stem if n == 1 else f"{stem}_b{k}", f, axes, k, t))
    seen: dict[str, int] = {}
    for e in entries:  # unique output names
        if e.name in seen:
            seen[e.name] += 1
            e.name = f"{e.name}_{seen[e.name]}"
        else:
            seen[e.name] = 0
    return entries


def default_calibration(cfg: BenchmarkConfig, out: Path, notes: list[str]) -> dict[str, Any] | None:
    """calibration.images when the config gives none: generated images, else the benchmark's own."""
    from efficientbioai.benchmark.data import CALIBRATION_SEED_OFFSET, write_generated

    if (cfg.compress.get("calibration") or {}).get("images"):
        return None
    generated = cfg.generated()
    if generated:
        spec = generated[0].model_copy(update={"count": 2})
        folder = out / "data" / "calibration"
        write_generated(spec, cfg.task, folder, None, seed_offset=CALIBRATION_SEED_OFFSET)
        notes.append(
            "calibration: 2 generated images with other seeds than the benchmark images "
            f"({folder.relative_to(out)})"
        )
        return {"images": str(folder)}
    if cfg.model.kind == "bioimageio":
        return None  # compress uses the package's own test tensors (and warns)
    first = cfg.source_paths()[0]
    notes.append(
        "calibration: no calibration.images given, so the benchmark images themselves calibrated the "
        "quantizer (your own, separate images in compress.calibration.images avoid this)"
    )
    return {"images": first.path, **({"axes": first.axes} if first.axes else {})}


def load_image(entry: dict[str, Any], model_axes: str) -> np.ndarray:
    """One benchmark image (an :meth:`ImageEntry.spec`) as an in-memory (C, *spatial) array in the model's
    layout."""
    from efficientbioai.infer.images import split_batch
    from efficientbioai.io import lazy_model_layout, read_axes, read_image

    path = Path(entry["path"])
    axes = entry.get("axes") or read_axes(path)
    samples = split_batch(read_image(path), axes, str(path))
    sample_axes = axes.replace("b", "") if axes else None
    image = lazy_model_layout(samples[entry.get("sample", 0)], sample_axes, model_axes, f"images: {path}")
    if not isinstance(image, np.ndarray):  # a lazily read array (zarr): read it whole
        image = image[(slice(None),) * image.ndim]
    return np.ascontiguousarray(np.asarray(image))
