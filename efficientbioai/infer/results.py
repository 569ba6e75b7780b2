"""What ``infer`` returns: per image, per engine run (latency, throughput, energy, metrics), and its table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai import metrics
from efficientbioai.config import InstanceConfig
from efficientbioai.energy import EnergyReading, energy_ratio_text, energy_summary, format_energy
from efficientbioai.infer.predict import Prediction
from efficientbioai.tables import table


@dataclass
class RunRecord:
    """One engine on one image."""

    engine: str
    seconds: float | None
    voxels: int
    energy: EnergyReading | None
    tiles: int = 0
    skipped: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    skipped_fraction: float | None = None  # voxels no engine computed (background value), of all voxels
    resumed: int = 0  # tiles an earlier, interrupted run had written (not run now); tiles counts them too

    def as_dict(self) -> dict[str, Any]:
        e = self.energy
        return {
            "engine": self.engine,
            "seconds": self.seconds,
            "voxels_per_second": self.voxels / self.seconds if self.seconds else None,
            "energy_joules": e.joules if e else None,
            "energy_method": e.method if e else None,
            "tiles": self.tiles,
            "skipped_tiles": self.skipped,
            "resumed_tiles": self.resumed,
            "skipped_voxel_fraction": self.skipped_fraction,
            "metrics": self.metrics,
        }


@dataclass
class ImageRecord:
    input: Path
    output: Path
    shape: tuple[int, ...]
    status: str  # "done" | "exists"
    runs: list[RunRecord] = field(default_factory=list)
    agreement: dict[str, float] = field(default_factory=dict)


@dataclass
class InferResult:
    images: list[ImageRecord]
    task: str | None
    threads: int

    def table(self) -> str:
        metric_names: list[str] = []
        for im in self.images:
            for r in im.runs:
                metric_names += [k for k in r.metrics if k not in metric_names]
        skipping = any(r.skipped for im in self.images for r in im.runs)
        header = [
            "image",
            "engine",
            "latency",
            "Mvoxel/s",
            "energy",
            "tiles (skipped)",
            *(["voxels skipped"] if skipping else []),
            *metric_names,
        ]
        rows = []
        totals: dict[str, list[float]] = {}
        for im in self.images:
            for r in im.runs:
                rows.append(
                    [
                        im.input.name,
                        r.engine,
                        f"{r.seconds:.2f} s" if r.seconds is not None else "exists",
                        f"{r.voxels / r.seconds / 1e6:.2f}" if r.seconds else "-",
                        format_energy(r.energy) if r.energy else "-",
                        _tiles(r),
                        *([_percent(r.skipped_fraction)] if skipping else []),
                        *[f"{r.metrics[k]:.4f}" if k in r.metrics else "-" for k in metric_names],
                    ]
                )
                if r.seconds is not None:
                    t = totals.setdefault(r.engine, [0.0, 0.0, 0.0, 0])
                    t[0] += r.seconds
                    t[1] += r.voxels
                    t[2] += r.energy.joules if r.energy and r.energy.joules is not None else float("nan")
                    t[3] += 1
        if len(self.images) > 1:
            for name, (sec, vox, joules, n) in totals.items():
                rows.append(
                    [
                        f"total ({n} image{'s' if n > 1 else ''})",
                        name,
                        f"{sec:.2f} s",
                        f"{vox / sec / 1e6:.2f}",
                        "-" if np.isnan(joules) else f"{joules:.1f} J",
                        "",
                        *([""] if skipping else []),
                        *[""] * len(metric_names),
                    ]
                )
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        out = [table(header, rows, title=f"inference ({threads}; latency = whole image, tiles to stitched)")]
        note = energy_note([r.energy for im in self.images for r in im.runs])
        if note:
            out.append(note)
        speed = self.speedup()
        if speed:
            out.append(speed)
        for im in self.images:
            if im.agreement:
                out.append(
                    f"{im.input.name}: engine vs original on the whole image: "
                    + ", ".join(f"{k} {v:.5g}" for k, v in im.agreement.items())
                )
        return "\n".join(out)

    def speedup(self) -> str | None:
        """'x× faster (what was compared), y× less energy (how it was obtained)' when the original ran too."""
        pairs = [(im.runs[0], im.runs[1]) for im in self.images if len(im.runs) == 2 and im.runs[0].seconds]
        if not pairs:
            return None
        eng = sum(a.seconds for a, _ in pairs)
        orig = sum(b.seconds for _, b in pairs)
        n = len(pairs)
        text = (
            f"{pairs[0][0].engine} is {orig / eng:.2f}x faster than {pairs[0][1].engine} "
            f"(whole image{'s' if n > 1 else ''}: tiles read to stitched output, pre/post-processing "
            f"included; {self.threads} thread{'s' if self.threads != 1 else ''}; after one untimed warm-up; "
            f"one timed run per image, not a median)"
        )
        ej = [a.energy.joules for a, _ in pairs if a.energy and a.energy.joules]
        oj = [b.energy.joules for _, b in pairs if b.energy and b.energy.joules]
        if len(ej) == len(oj) == len(pairs):
            e = pairs[0][0].energy
            text += " and " + energy_ratio_text(sum(oj) / sum(ej), e.method, e.details)
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "threads": self.threads,
            "images": [
                {
                    "input": str(im.input),
                    "output": str(im.output),
                    "shape": list(im.shape),
                    "status": im.status,
                    "runs": [r.as_dict() for r in im.runs],
                    "agreement": im.agreement,
                }
                for im in self.images
            ],
        }


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.1%}"


def energy_note(readings: list[EnergyReading | None]) -> str | None:
    """'energy: <how it was obtained> — <sources>' for the readings that have a figure."""
    return energy_summary(readings)


def _tiles(r: RunRecord) -> str:
    """The tiles column: tiles this run visited (skipped ones), and those a resumed run found written."""
    if not r.tiles:
        return "-"
    if r.resumed:
        return f"{r.tiles - r.resumed} ({r.skipped}) + {r.resumed} resumed"
    return f"{r.tiles} ({r.skipped})"


def score(
    task: str | None, pred: np.ndarray, target: np.ndarray | None, threshold: float, instance: InstanceConfig
) -> dict:
    """The task metrics of ``pred`` against ``target`` (empty without a target or a task); ``threshold``
    and ``instance`` are ``infer``'s settings for masks and instances."""
    if target is None or task is None:
        return {}
    marked = ~np.isfinite(pred)
    if marked.any():  # outputs of filled NaN / inf inputs (nonfinite: fill): not scored, and said so
        pred = np.where(marked, np.asarray(target, pred.dtype).reshape(pred.shape), pred)
    out = metrics.task_metrics(task, pred, target, threshold=threshold, instance_method=instance.method)
    if marked.any():
        out["unscored_nonfinite"] = int(marked.sum())
    return out


def localization_note(pred: Prediction) -> str:
    """One line on what sample localisation found in an image."""
    loc = pred.localization
    if not loc.found:
        return "sample localisation found no foreground; the whole image was run"
    return (
        f"sample in {len(loc.regions)} region(s) (downsampled {'x'.join(map(str, loc.factor))}, Otsu "
        f"threshold {loc.threshold:.4g}); {pred.skipped} of {pred.tiles} tiles skipped, "
        f"{pred.skipped_fraction:.1%} of the voxels hold the background value"
    )
