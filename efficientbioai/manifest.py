"""The artifact directory's ``manifest.yaml``: the contract between ``compress`` and ``infer``."""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from efficientbioai.errors import EfficientBioAIError

MANIFEST = "manifest.yaml"
MANIFEST_VERSION = 1


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in (
        "efficientbioai",
        "torch",
        "openvino",
        "nncf",
        "onnx",
        "onnxruntime",
        "onnxslim",
        "numpy",
        "monai",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _plain(obj: Any) -> Any:
    """Make a structure safe for ``yaml.safe_dump`` (tuples, paths, NumPy scalars)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(yaml.safe_dump(_plain(manifest), sort_keys=False))
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise EfficientBioAIError(
            f"{directory} is not an efficientbioai artifact directory (no {MANIFEST})",
            "point at a directory written by `efficientbioai compress`",
        )
    data = yaml.safe_load(path.read_text())
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise EfficientBioAIError(
            f"{path}: manifest version {data.get('manifest_version')} is not supported by this efficientbioai",
            "re-run `efficientbioai compress` with this version",
        )
    return data
