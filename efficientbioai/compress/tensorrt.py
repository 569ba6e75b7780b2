"""The ``tensorrt`` export target: the TensorRT-ready ONNX graph in the artifact, checked on the CPU, and
the engine plan built and checked where a GPU is present (else on first use by ``infer``).

The graph at each precision comes from :mod:`efficientbioai.compress.trt_graph`; the optimisation
profile (batch and spatial ranges) from :func:`profile_shapes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.compress.trt_graph import prepare_onnx
from efficientbioai.errors import ConfigError
from efficientbioai.tiling import round_up, valid_size


def profile_shapes(
    tile_shape: Sequence[int],
    channels: int,
    tile_min: Sequence[int] | None = None,
    tile_step: Sequence[int] | None = None,
    batch_size: int = 1,
    max_batch_size: int = 8,
) -> dict[str, tuple[int, ...]]:
    """TensorRT optimization profile (min / opt / max input shapes) around a tile shape.

    Batch: 1 … ``max(max_batch_size, batch_size)``, optimised for ``batch_size``. Spatial axes: from
    half the tile to twice the tile, each rounded to a size the network accepts (``tile_min + k ×
    tile_step``), optimised for the tile itself, so that one engine also serves nearby tile sizes.
    """
    ndim = len(tile_shape)
    tmin = list(tile_min or [1] * ndim)
    step = list(tile_step or [1] * ndim)
    if len(tmin) != ndim or len(step) != ndim:
        raise ConfigError(
            f"tile shape {list(tile_shape)} has {ndim} axes but the model's valid sizes have {len(tmin)}",
            "give a tile shape with one value per spatial axis",
        )
    for t, m, s in zip(tile_shape, tmin, step, strict=True):
        if not valid_size(t, m, s):
            raise ConfigError(
                f"tile shape {list(tile_shape)} is not a shape this network accepts (valid sizes per axis "
                f"are {tmin} + k × {step})",
                f"use {[round_up(x, a, b) for x, a, b in zip(tile_shape, tmin, step, strict=True)]}",
            )
    if batch_size < 1 or max_batch_size < 1:
        raise ConfigError("batch sizes must be at least 1", "set tiling.batch_size ≥ 1")
    lo = [min(round_up(max(1, t // 2), m, s), t) for t, m, s in zip(tile_shape, tmin, step, strict=True)]
    hi = [max(t, m + ((2 * t - m) // s) * s) for t, m, s in zip(tile_shape, tmin, step, strict=True)]
    top = max(max_batch_size, batch_size)
    return {
        "min": (1, channels, *lo),
        "opt": (batch_size, channels, *tile_shape),
        "max": (top, channels, *hi),
    }


def profile_covers(profile: dict[str, Sequence[int]], shape: Sequence[int]) -> bool:
    """Whether an input shape lies inside a profile's min … max box."""
    return all(a <= s <= b for a, s, b in zip(profile["min"], shape, profile["max"], strict=True))


# ---------------------------------------------------------------------------------- fp16 / bf16


def gpu_status() -> tuple[bool, str]:
    """(whether a TensorRT engine can be built here, why not)."""
    from efficientbioai.engines.cuda import cuda_available

    if not cuda_available():
        return False, "this machine has no NVIDIA GPU usable by PyTorch (torch.cuda.is_available() is False)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'efficientbioai[gpu]')"
    return True, ""


def build_target(
    cfg,
    artifact: Path,
    chosen_precision: str,
    calibration_tiles: list[np.ndarray],
    holdout_tiles: list[np.ndarray],
    reference: np.ndarray,
    run_tiles,
    fidelity,
    threads: int,
    quiet: bool = True,
    log=None,
    tile_min: Sequence[int] | None = None,
    tile_step: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write ``tensorrt/`` into the artifact being built; return the manifest's ``engines.tensorrt``.

    ``run_tiles(engine, tiles)`` gives postprocessed, halo-cropped outputs and ``fidelity(out)`` the
    fidelity figures against ``reference`` (the original's outputs on ``holdout_tiles``). The graph is
    checked on the CPU with ONNX Runtime (every precision but bf16); with a GPU and TensorRT here the
    plan is built and checked too, otherwise the entry records that it is built on first use.
    """
    from efficientbioai.engines import OnnxRuntimeEngine

    tc = cfg.export.tensorrt
    precision = tc.precision or chosen_precision
    log = log or (lambda msg: None)
    log(f"      tensorrt: preparing the {precision} ONNX graph")
    q = cfg.quantize
    onnx_path, step = prepare_onnx(
        artifact / "model.onnx",
        precision,
        artifact / "tensorrt",
        calibration_tiles if precision in ("int8", "fp8") else None,
        per_channel=q.per_channel,
        fast_bias_correction=q.fast_bias_correction,
        ignored=q.keep_float,
        quiet=quiet,
    )
    rel = str(onnx_path.relative_to(artifact))
    entry: dict[str, Any] = {
        "backend": "tensorrt",
        "precision": precision,
        "onnx": rel,
        "plan": None,
        "built_for": None,
        "batch_size": tc.batch_size,
        "max_batch_size": tc.max_batch_size,
        "preparation": step,
    }
    if precision == "bf16":
        entry["cpu_check"] = {
            "status": "not run: ONNX Runtime has no bf16 convolutions on the CPU (graph validated by the ONNX "
            "checker only)"
        }
    else:
        with OnnxRuntimeEngine(onnx_path, threads) as ort_engine:
            out = run_tiles(ort_engine, holdout_tiles)
        fig = fidelity(out)
        entry["cpu_check"] = {
            "runtime": "onnxruntime CPU (the same graph TensorRT builds from)",
            "tiles": len(holdout_tiles),
            "pearson": fig["pearson"],
            "relative_l2": fig["relative_l2"],
        }
        log(f"      tensorrt {precision} graph on the CPU: Pearson r {fig['pearson']:.5f} to the original")
    ok, why = gpu_status()
    if not ok:
        entry["plan_status"] = f"built on first use on a GPU machine ({why})"
        log(f"      tensorrt: no engine built here: {why}; `infer` builds it on the GPU machine")
        return entry
    channels = int(holdout_tiles[0].shape[0])
    tile = tuple(int(s) for s in holdout_tiles[0].shape[1:])
    entry["profile"] = {
        k: list(v)
        for k, v in profile_shapes(
            tile, channels, tile_min, tile_step, tc.batch_size, tc.max_batch_size
        ).items()
    }
    return entry | _build_here(
        artifact, onnx_path, entry, precision, holdout_tiles, run_tiles, fidelity, quiet, log
    )


def _build_here(artifact, onnx_path, entry, precision, holdout_tiles, run_tiles, fidelity, quiet, log):
    """Build and check the plan on this machine's GPU (index 0)."""
    import time

    from efficientbioai.engines.cuda import gpu_description
    from efficientbioai.engines.tensorrt import (
        TensorRTEngine,
        build_plan,
        check_precision_supported,
        plan_key,
        tensorrt_version,
    )

    gpu = gpu_description(0)
    check_precision_supported(precision, gpu)
    version = tensorrt_version() or "unknown"
    log(f"      tensorrt: building the engine on {gpu['name']} (TensorRT {version})")
    t0 = time.perf_counter()
    profile = {k: tuple(v) for k, v in entry["profile"].items()}
    plan = build_plan(onnx_path, profile, quiet=quiet)
    seconds = time.perf_counter() - t0
    (artifact / "tensorrt" / "model.plan").write_bytes(plan)
    with TensorRTEngine(plan, precision) as engine:
        fig = fidelity(run_tiles(engine, holdout_tiles))
    return {
        "plan": "tensorrt/model.plan",
        "built_for": {
            "gpu": gpu["name"],
            "compute_capability": gpu["compute_capability"],
            "tensorrt": version,
            "key": plan_key(gpu, version),
            "build_seconds": seconds,
        },
        "gpu_check": {
            "tiles": len(holdout_tiles),
            "pearson": fig["pearson"],
            "relative_l2": fig["relative_l2"],
        },
    }
