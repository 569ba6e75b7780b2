"""Which existing outputs a run may skip: only those it would write the same way.

An output records what produced it (:mod:`efficientbioai.io.provenance`): the artifact's checksum (the
sha256 of its ``manifest.yaml``, which lists every engine file's checksum), the engine, the input file
(name, size, modification time), the settings that change values and the efficientbioai version. A run
skips an existing output only when that record equals the one it would write; an output written by
another model or other settings, one with no record, or one that cannot be read is refused up front,
before any engine runs, naming what differs and the fix (``overwrite: true`` / ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from efficientbioai.errors import EfficientBioAIError
from efficientbioai.io.provenance import read_provenance

MATCHED = ("producer", "artifact_sha256", "engine", "input", "settings")
"""The parts of a record that must be equal for an output to be skipped (others are informative)."""


def artifact_checksum(directory: Path) -> str:
    """The sha256 of the artifact's ``manifest.yaml`` (which holds its files' checksums)."""
    return hashlib.sha256((Path(directory) / "manifest.yaml").read_bytes()).hexdigest()


def input_stamp(path: Path) -> dict[str, Any]:
    """What identifies an input file: its name, size and modification time."""
    try:
        stat = Path(path).stat()
        return {"name": Path(path).name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError:
        return {"name": Path(path).name}


def predictor_settings(predictor: Any, cfg: Any) -> dict[str, Any]:
    """The settings of a sliding-window run that change its output values."""
    import dataclasses

    loc = predictor.localizer
    return {
        "axes": cfg.axes,
        "tile_shape": [int(n) for n in predictor.tile_shape],
        "overlap": predictor.overlap,
        "blend": predictor.blend,
        "background": [predictor.skip_background, predictor.background_threshold],
        "localize": dataclasses.asdict(loc) if loc is not None else None,
        "nonfinite": [cfg.nonfinite, cfg.fill_value],
    }


def make_record(
    directory: Path, model: str, engine: str, input_path: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    """The provenance record of one input's outputs."""
    from efficientbioai import __version__

    return json.loads(  # plain JSON types, as they are read back
        json.dumps(
            {
                "producer": f"efficientbioai {__version__}",
                "model": model,
                "artifact": str(directory),
                "artifact_sha256": artifact_checksum(directory),
                "engine": engine,
                "input": input_stamp(input_path),
                "settings": settings,
            },
            default=str,
        )
    )


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    out = []
    for key in MATCHED:
        a, b = found.get(key), expected.get(key)
        if a == b:
            continue
        if key == "artifact_sha256":
            out.append(
                f"another model: '{found.get('model')}' from {found.get('artifact')} "
                f"(manifest sha256 {str(a)[:12]}…, this artifact's {str(b)[:12]}…)"
            )
        elif key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{k}: {a.get(k)!r} then, {b.get(k)!r} now"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif key == "input":
            same = isinstance(a, dict) and isinstance(b, dict) and a.get("name") == b.get("name")
            out.append(
                f"its input {b.get('name')} was modified since (size or modification time differ)"
                if same
                else f"another input ({(a or {}).get('name')!r} then, {(b or {}).get('name')!r} now)"
            )
        else:
            out.append(f"{key}: {a!r} then, {b!r} now")
    return out


def check_existing(paths: Sequence[Path], expected: dict[str, Any], overwrite: bool) -> bool:
    """Whether the outputs ``paths`` of one input exist and may be skipped (``False``: compute them).

    Every path must exist for a skip; each must record ``expected`` (see :data:`MATCHED`). Otherwise
    :class:`~efficientbioai.errors.EfficientBioAIError` says which output differs and how.
    """
    if overwrite or not all(Path(p).exists() for p in paths):
        return False
    fix = "set overwrite: true (or pass --overwrite) to compute them again, or choose another output folder"
    for p in paths:
        found = read_provenance(Path(p))
        if found is None:
            raise EfficientBioAIError(
                f"{p} exists but records no provenance: it was written by another program or an older "
                "efficientbioai, so it cannot be known to be this model's output",
                fix,
            )
        diff = _differences(found, expected)
        if diff:
            raise EfficientBioAIError(
                f"{p} exists but was written by another model or other settings: {'; '.join(diff)}", fix
            )
    return True


def plan_outputs(
    files: Sequence[Path],
    outputs: Sequence[Sequence[Path]],
    directory: Path,
    model: str,
    engine: str,
    settings: dict[str, Any],
    overwrite: bool,
) -> tuple[list[dict[str, Any]], list[bool]]:
    """(provenance record, skip) per input, every existing output checked before any work starts."""
    records = [make_record(directory, model, engine, f, settings) for f in files]
    skips = [check_existing(o, r, overwrite) for o, r in zip(outputs, records, strict=True)]
    return records, skips
