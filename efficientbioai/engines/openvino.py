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
        hint: str = "LATENCY",
    ):
        import openvino as ov

        self.core = ov.Core()
        if isinstance(model, (str, Path)):
            model = self.core.read_model(str(model))
        self.threads = threads or default_threads()
        self.requested_precision = precision
        config = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "PERFORMANCE_HINT": hint,
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

    def map(self, batches, depth: int | None = None):
        """Outputs of ``batches`` in order, run through an ``AsyncInferQueue``.

        The caller's thread reads the next batch and consumes finished outputs while OpenVINO infers;
        ``depth`` requests (default: OpenVINO's optimal number, at least 2) are in flight.
        """
        import openvino as ov

        if depth is None:
            depth = max(2, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        queue = ov.AsyncInferQueue(self.compiled, depth)
        done: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def finished(request, index):
            try:
                done[index] = np.array(request.get_output_tensor(0).data, copy=True)
            except BaseException as exc:  # surfaced in the caller's thread
                errors.append(exc)

        queue.set_callback(finished)
        inputs: dict[int, np.ndarray] = {}  # keep inputs alive until their request has finished
        submitted = emitted = 0
        try:
            for batch in batches:
                inputs[submitted] = np.ascontiguousarray(batch, dtype=np.float32)
                queue.start_async({0: inputs[submitted]}, submitted)  # blocks while every request is busy
                submitted += 1
                while emitted in done:
                    inputs.pop(emitted, None)
                    yield done.pop(emitted)
                    emitted += 1
                if errors:
                    raise errors[0]
            queue.wait_all()
            if errors:
                raise errors[0]
            while emitted < submitted:
                yield done.pop(emitted)
                emitted += 1
        finally:
            queue.wait_all()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self.device, "requested_precision": self.requested_precision}

    def close(self) -> None:
        self.request = self.compiled = None
