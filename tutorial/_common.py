"""Helpers shared by the tutorials' run.py scripts: run a command, write a config, draw the picture.

Each tutorial's run.py runs the same `efficientbioai` commands its README shows, in a work folder
(default: ``work/`` next to the script; ``--workdir`` elsewhere), with the tutorial's config files
copied there. ``--quick`` shrinks images, training and calibration so that the tutorial finishes in
well under a minute (the test suite runs every tutorial that way); the README's tables come from full runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_MODEL = REPO.parent / "shared" / "models" / "unet2d_nuclei_broad"


def parse_args(script: str, description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that it runs, in < 1 min")
    parser.add_argument(
        "--workdir", type=Path, default=Path(script).resolve().parent / "work", help="folder for all files"
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def step(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def efficientbioai(*args: str, cwd: Path, log: str | None = None) -> str:
    """Run ``efficientbioai ARGS`` in ``cwd`` as the README shows it; print and return its output."""
    print(f"$ efficientbioai {' '.join(args)}", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "efficientbioai", *args], cwd=cwd, capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"`efficientbioai {' '.join(args)}` failed (exit {proc.returncode})")
    print(proc.stdout, flush=True)
    if log:
        (cwd / log).write_text(proc.stdout)
    return proc.stdout


def _merge(base: dict, updates: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in updates.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(src: Path, dst: Path, updates: dict[str, Any] | None = None) -> Path:
    """Copy the tutorial's config ``src`` to ``dst``, with ``updates`` merged in (for --quick, paths)."""
    data = yaml.safe_load(src.read_text())
    dst.write_text(yaml.safe_dump(_merge(data, updates or {}), sort_keys=False))
    return dst


# ------------------------------------------------------------------------------------------- picture


def model_outputs(artifact: Path, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original, compressed) outputs of an artifact for one (C, *spatial) raw image run as one tile."""
    from efficientbioai.artifact import Artifact
    from efficientbioai.engines import default_threads
    from efficientbioai.processing import apply_steps

    art = Artifact(artifact)
    manifest = art.manifest
    axes = manifest.input.axes
    x = apply_steps(image[np.newaxis].astype(np.float32), manifest.input.preprocessing, axes)
    outs = []
    for engine in (art.open_original(default_threads()), art.open_engine(None, default_threads())):
        with engine:
            outs.append(apply_steps(engine(x), manifest.output.postprocessing, axes)[0])
    return outs[0], outs[1]


def _labels_rgb(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    colours = rng.integers(60, 255, size=(int(labels.max()) + 1, 3)).astype(np.uint8)
    colours[0] = 0
    return colours[labels]


def picture(path: Path, panels: list[tuple[str, np.ndarray, str]], size: int = 200) -> Path:
    """A row of titled panels: (title, 2D array, kind) with kind 'gray', 'same:<i>' (the display range
    of panel i), 'diff' (blue − / red +) or 'labels'. Small on purpose (a few tens of kB)."""
    from PIL import Image, ImageDraw

    from efficientbioai.benchmark.panels import display_range, diverging, gray

    ranges: list[tuple[float, float]] = []
    tiles = []
    for _title, arr, kind in panels:
        arr = np.asarray(arr)
        if kind == "labels":
            rgb = _labels_rgb(arr.astype(np.int64))
            ranges.append((0, 1))
        elif kind == "diff":
            limit = max(float(np.percentile(np.abs(arr), 99.9)), 1e-6)
            rgb = diverging(arr.astype(np.float32), limit)
            ranges.append((-limit, limit))
        else:
            lo, hi = ranges[int(kind.split(":")[1])] if kind.startswith("same:") else display_range(arr)
            ranges.append((lo, hi))
            rgb = np.repeat(gray(arr.astype(np.float32), lo, hi)[..., None], 3, axis=-1)
        tiles.append(Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST))
    pad, head = 6, 18
    canvas = Image.new("RGB", (len(tiles) * (size + pad) + pad, size + head + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((title, _, _), tile) in enumerate(zip(panels, tiles, strict=True)):
        x0 = pad + i * (size + pad)
        draw.text((x0, 3), title, fill="black")
        canvas.paste(tile, (x0, head))
    canvas.save(path, optimize=True)
    print(f"picture: {path}", flush=True)
    return path
