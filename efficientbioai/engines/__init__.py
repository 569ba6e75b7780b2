"""Inference engines behind one interface (:class:`Engine`): OpenVINO, ONNX Runtime, PyTorch.

The NVIDIA GPU engines live in :mod:`efficientbioai.engines.cuda` (PyTorch CUDA, and the pipelined batch
submission every GPU engine shares) and :mod:`efficientbioai.engines.tensorrt` (TensorRT); they are
imported where used, so that machines without a GPU never load CUDA or TensorRT.
"""

from __future__ import annotations

from efficientbioai.engines.base import Engine, default_threads, latency_basis, median_latency_ms
from efficientbioai.engines.onnxruntime import OnnxRuntimeEngine
from efficientbioai.engines.openvino import OpenVINOEngine
from efficientbioai.engines.pytorch import TorchEngine


def reference_engine(loaded, threads: int | None = None) -> Engine:
    """The original model at fp32: PyTorch eager, or ONNX Runtime for models that exist only as ONNX."""
    if loaded.module is not None:
        return TorchEngine(loaded.module, threads)
    return OnnxRuntimeEngine(loaded.onnx_path, threads)


__all__ = [
    "Engine",
    "OnnxRuntimeEngine",
    "OpenVINOEngine",
    "TorchEngine",
    "default_threads",
    "latency_basis",
    "median_latency_ms",
    "reference_engine",
]
