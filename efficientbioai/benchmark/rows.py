"""The benchmark's rows: one model (the original or a compressed variant) on one device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficientbioai.artifact import Manifest
from efficientbioai.errors import ConfigError

if TYPE_CHECKING:
    from efficientbioai.benchmark.protocol import Worker


@dataclass
class Row:
    id: str
    variant: str | None
    device: str
    kind: str  # "original" | "variant"
    precision: str = "fp32"  # GPU rows: autocast precision
    artifact: Path | None = None
    manifest: Manifest | None = None
    compress_seconds: float | None = None
    status: str = "ok"  # ok | failed
    error: str | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)  # each: repeat, image, result
    worker: Worker | None = None


def resolve_devices(devices: str | list[str], gpu: dict[str, Any], notes: list[str]) -> list[str]:
    """The devices to run: ``devices`` from the config ("auto" or a list) against the probed ``gpu``."""
    if devices == "auto":
        if gpu["available"]:
            return ["cpu", "gpu"]
        notes.append(f"GPU: {gpu['note']}; there are no GPU rows")
        return ["cpu"]
    devices = list(dict.fromkeys(devices))
    if "gpu" in devices and not gpu["available"]:
        raise ConfigError(
            f"devices: gpu was asked for, but {gpu['note']}",
            "use devices: auto (the GPU when there is one) or devices: [cpu]",
        )
    return devices


def device_rows(variants: list[Row], devices: list[str], notes: list[str]) -> list[Row]:
    """Every row of the benchmark from the compressed ``variants`` (CPU rows, at least one ok): per device
    the original, then the variants; failed variants are kept (the report lists them)."""
    ok = [r for r in variants if r.status == "ok"]
    rows: list[Row] = []
    if "cpu" in devices:
        rows.append(Row("original", None, "cpu", "original", "fp32", ok[0].artifact, ok[0].manifest))
        rows += variants
    else:
        notes.append("CPU rows: not run (devices excludes cpu)")
        rows += [r for r in variants if r.status != "ok"]
    if "gpu" in devices:
        rows += gpu_rows(variants, notes)
    return rows


def gpu_rows(variants: list[Row], notes: list[str]) -> list[Row]:
    """GPU rows: the original (PyTorch fp32) and, as PyTorch autocast, the fp16 / bf16 variants."""
    base = next(r for r in variants if r.status == "ok")
    rows = [Row("original@gpu", None, "gpu", "original", "fp32", base.artifact, base.manifest)]
    skipped = []
    for r in variants:
        if r.status != "ok":
            continue
        prec = r.manifest.precision
        if prec in ("fp16", "bf16") and not r.manifest.pruned:
            rows.append(Row(f"{r.variant}@gpu", r.variant, "gpu", "variant", prec, r.artifact, r.manifest))
        else:
            skipped.append(r.variant)
    if skipped:
        notes.append(
            f"GPU: no GPU engine for {', '.join(skipped)} in this version (int8, pruned and fp32-engine variants "
            "run on NVIDIA GPUs through TensorRT: `efficientbioai infer` with backend tensorrt, compared in "
            "benchmarks/gpu.py); the GPU rows are the original "
            "PyTorch model in fp32 and, for fp16 / bf16 variants, the same model under torch.autocast"
        )
    return rows
