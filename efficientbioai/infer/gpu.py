"""``infer`` on NVIDIA GPUs: which engine runs by default, and opening the GPU engines of an artifact.

Default (``backend:`` not set): with a usable GPU, ``tensorrt`` when the artifact has a TensorRT graph
and the ``tensorrt`` package is installed, else ``torch-cuda`` (the original PyTorch model at
``gpu.torch_precision``) when the original is a PyTorch model; without a GPU, the artifact's primary
(CPU) engine. :func:`choose_backend` returns the choice and the reason, which ``infer`` prints.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from efficientbioai.config import GpuConfig
from efficientbioai.engines import Engine
from efficientbioai.errors import ConfigError, EfficientBioAIError

GPU_BACKENDS = ("tensorrt", "torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt")


def choose_backend(manifest: dict[str, Any], requested: str | None) -> tuple[str, str]:
    """(backend, why) for ``infer``; ``requested`` (the config's ``backend``) wins when set."""
    from efficientbioai.compress.tensorrt import gpu_status
    from efficientbioai.engines.cuda import cuda_available

    primary = manifest["engines"]["primary"]["backend"]
    if requested is not None:
        return requested, "backend set in the config"
    if not cuda_available():
        return primary, "no NVIDIA GPU here: the artifact's CPU engine"
    if "tensorrt" in manifest["engines"]:
        ok, why = gpu_status()
        if ok:
            return "tensorrt", "a GPU is present and the artifact has a TensorRT engine"
        reason = why
    else:
        reason = "the artifact has no TensorRT engine (compress with export.targets: [openvino, tensorrt])"
    original = (manifest.get("latency") or {}).get("original") or {}
    if manifest["model"].get("config") and original.get("backend") == "torch":  # a PyTorch original
        return "torch-cuda", f"a GPU is present; TensorRT not used: {reason}"
    return primary, f"a GPU is present but {reason}, and the original is not a PyTorch model"


def nvml_index(cuda_index: int) -> int:
    """NVML's index of CUDA device ``cuda_index`` (NVML counts every GPU; CUDA only the visible ones)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        with contextlib.suppress(ValueError, IndexError):
            return int(visible.split(",")[cuda_index])
    return cuda_index


def open_gpu_engine(
    directory: Path,
    manifest: dict[str, Any],
    backend: str,
    threads: int,
    gpu: GpuConfig | None = None,
    tile_shape: tuple[int, ...] | None = None,
    batch_size: int = 1,
    quiet: bool = True,
) -> Engine:
    """The artifact's engine for one of :data:`GPU_BACKENDS`, or a clear error naming what is missing."""
    from efficientbioai.engines.cuda import require_cuda

    gpu = gpu or GpuConfig()
    engines = manifest["engines"]
    if backend == "tensorrt":
        from efficientbioai.compress.tensorrt import profile_shapes
        from efficientbioai.engines.tensorrt import TensorRTEngine, load_plan, require_tensorrt

        if "tensorrt" not in engines:
            raise ConfigError(
                f"backend: {directory} has no TensorRT engine (built: "
                f"{', '.join(k for k in engines if k != 'primary')})",
                "compress with export.targets: [openvino, tensorrt], or use backend: torch-cuda",
            )
        require_cuda("backend tensorrt", gpu.index)
        require_tensorrt()
        from efficientbioai.infer.pipeline import verify_artifact

        entry = engines["tensorrt"]
        verify_artifact(directory, manifest, "tensorrt/")
        inp = manifest["input"]
        tile = tile_shape or tuple(manifest["calibration"]["tile_shape"])
        profile = profile_shapes(
            tile,
            inp["channels"],
            inp.get("tile_min"),
            inp.get("tile_step"),
            batch_size,
            max(batch_size, entry.get("max_batch_size", 8)),
        )
        plan, info = load_plan(directory, entry, profile, gpu.index, quiet=quiet)
        engine = TensorRTEngine(plan, entry["precision"], gpu.index)
        engine.plan_info = info
        return engine
    if backend in ("onnxruntime-cuda", "onnxruntime-tensorrt"):
        from efficientbioai.engines import OnnxRuntimeEngine
        from efficientbioai.infer.pipeline import verify_artifact

        require_cuda(f"backend {backend}", gpu.index)
        verify_artifact(directory, manifest, "model.onnx")
        engine = OnnxRuntimeEngine(
            directory / engines["onnx"]["path"], threads, device=backend.split("-")[1], gpu_index=gpu.index
        )
        engine.label = f"{backend} fp32"
        return engine
    if backend == "torch-cuda":
        from efficientbioai.engines import TorchEngine
        from efficientbioai.engines.cuda import TorchCudaEngine
        from efficientbioai.infer.pipeline import open_original

        require_cuda("backend torch-cuda", gpu.index)
        original = open_original(manifest, threads)
        if not isinstance(original, TorchEngine):
            raise EfficientBioAIError(
                "backend torch-cuda: the original model exists only as ONNX, there is no PyTorch module",
                "use backend: tensorrt or onnxruntime-cuda",
            )
        engine = TorchCudaEngine(original.module, gpu.torch_precision, gpu.index, gpu.channels_last)
        engine.label = f"torch-cuda {gpu.torch_precision} (original)"
        return engine
    raise ConfigError(f"backend: {backend!r} is not a GPU backend", f"use one of {', '.join(GPU_BACKENDS)}")
