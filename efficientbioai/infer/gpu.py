"""``infer`` on NVIDIA GPUs: which engine runs by default.

Default (``backend:`` not set): with a usable GPU, ``tensorrt`` when the artifact has a TensorRT graph
and the ``tensorrt`` package is installed, else ``torch-cuda`` (the original PyTorch model at
``gpu.torch_precision``) when the original is a PyTorch model; without a GPU, the artifact's primary
(CPU) engine. :func:`choose_backend` returns the choice and the reason, which ``infer`` prints. The GPU
engines themselves are opened by :meth:`efficientbioai.artifact.Artifact.open_engine`.
"""

from __future__ import annotations

import contextlib
import os

from efficientbioai.artifact import Manifest
from efficientbioai.config import GPU_BACKENDS

__all__ = ["GPU_BACKENDS", "choose_backend", "nvml_index"]


def choose_backend(manifest: Manifest, requested: str | None) -> tuple[str, str]:
    """(backend, why) for ``infer``; ``requested`` (the config's ``backend``) wins when set."""
    from efficientbioai.compress.tensorrt import gpu_status
    from efficientbioai.engines.cuda import cuda_available

    primary = manifest.engines.primary.backend
    if requested is not None:
        return requested, "backend set in the config"
    if not cuda_available():
        return primary, "no NVIDIA GPU here: the artifact's CPU engine"
    if manifest.engines.tensorrt is not None:
        ok, why = gpu_status()
        if ok:
            return "tensorrt", "a GPU is present and the artifact has a TensorRT engine"
        reason = why
    else:
        reason = "the artifact has no TensorRT engine (compress with export.targets: [openvino, tensorrt])"
    if manifest.original_is_torch:
        return "torch-cuda", f"a GPU is present; TensorRT not used: {reason}"
    return primary, f"a GPU is present but {reason}, and the original is not a PyTorch model"


def nvml_index(cuda_index: int) -> int:
    """NVML's index of CUDA device ``cuda_index`` (NVML counts every GPU; CUDA only the visible ones)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        with contextlib.suppress(ValueError, IndexError):
            return int(visible.split(",")[cuda_index])
    return cuda_index
