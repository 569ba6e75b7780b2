"""ONNX Runtime on CPU: the portable fp32 engine (its int8 was never faster than its fp32 here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from efficientbioai.engines.base import Engine, default_threads


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"
    precision = "fp32"

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.threads = threads or default_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def close(self) -> None:
        self.session = None
