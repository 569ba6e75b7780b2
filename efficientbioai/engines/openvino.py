"""OpenVINO on CPUs: compiled once with explicit threads and inference precision."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.engines.base import Engine, default_threads

# our names → OpenVINO's INFERENCE_PRECISION_HINT
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_FROM_OV = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


class OpenVINOEngine(Engine):
    """An OpenVINO model compiled for one device.

    ``model`` is an IR ``.xml`` path, an ONNX path or an ``openvino.Model``. ``precision`` is the
    precision of the float parts: ``fp32``, ``bf16`` or ``fp16`` (int8 models carry their quantized
    layers in the IR and run their remaining float layers in ``precision``). OpenVINO's CPU default is
    bf16 on CPUs that support it, so the hint is always set explicitly and read back.
    """

    backend = "openvino"

    def __init__(
        self,
        model: str | Path | Any,
        precision: str = "fp32",
        threads: int | None = None,
        device: str = "CPU",
    ):
        import openvino as ov

        self.core = ov.Core()
        if isinstance(model, (str, Path)):
            model = self.core.read_model(str(model))
        self.threads = threads or default_threads()
        self.requested_precision = precision
        config = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
        }
        if device != "CPU":
            config.pop("INFERENCE_NUM_THREADS")
        self.compiled = self.core.compile_model(model, device, config)
        actual = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        actual = actual.get_type_name() if hasattr(actual, "get_type_name") else str(actual)
        self.precision = _FROM_OV.get(actual, actual)
        if precision != "int8" and self.precision != precision:
            warnings.warn(
                f"OpenVINO on this {device} runs {self.precision} when asked for {precision} "
                f"(the device has no native {precision} support); the manifest records {self.precision}",
                stacklevel=2,
            )
        self.device = device
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(result[self.compiled.output(0)])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self.device, "requested_precision": self.requested_precision}

    def close(self) -> None:
        self.request = self.compiled = None
