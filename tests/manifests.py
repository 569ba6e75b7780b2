"""A valid :class:`~efficientbioai.artifact.Manifest` for tests that need one without running compress."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficientbioai.artifact import Manifest, write_manifest

BASE: dict[str, Any] = {
    "created": "2026-01-01T00:00:00+00:00",
    "efficientbioai_version": "0",
    "model": {"name": "stub", "kind": "pytorch"},
    "input": {"axes": "bczyx", "channels": 1, "tile_min": [1, 1, 1], "tile_step": [1, 1, 1], "halo": [0, 0, 0]},
    "output": {"channels": 1},
    "precision": "int8",
    "engines": {
        "onnx": {"backend": "onnxruntime", "precision": "fp32", "path": "model.onnx"},
        "primary": {"backend": "openvino", "precision": "int8", "path": "openvino/model.xml"},
    },
    "calibration": {"images": [], "tile_shape": [16, 32, 32], "tiles": 1},
    "fidelity": {"pearson": 1.0, "relative_l2": 0.0, "tiles": 1},
    "latency": {"tile_shape": [1, 1, 16, 32, 32], "threads": 1, "original": {}, "compressed": {}},
    "size": {},
}


def manifest_stub(**parts: Any) -> Manifest:
    """BASE with the given top-level parts replaced (whole parts, not merged)."""
    return Manifest.model_validate({**BASE, **parts})


def write_manifest_stub(directory: Path, **parts: Any) -> Manifest:
    """Write :func:`manifest_stub` into ``directory`` as compress does (manifest.yaml and its checksum)."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_manifest(directory, manifest_stub(**parts))
