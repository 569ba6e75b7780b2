"""ONNX Runtime: the portable fp32 engine on CPU (its int8 was never faster than its fp32 here), and on
NVIDIA GPUs through its CUDA / TensorRT execution providers when ``onnxruntime-gpu`` is installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from efficientbioai.engines.base import Engine, default_threads
from efficientbioai.errors import EfficientBioAIError

# our device names → ONNX Runtime execution providers, in order of preference (CPU always last)
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def select_providers(device: str = "cpu", available: list[str] | None = None) -> list[str]:
    """The execution providers for ``device`` (cpu | cuda | tensorrt), or a clear error when missing."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise EfficientBioAIError(
            f"onnxruntime: unknown device {device!r}", f"use one of {', '.join(PROVIDERS)}"
        )
    available = ort.get_available_providers() if available is None else available
    wanted = PROVIDERS[device]
    if wanted[0] not in available:
        raise EfficientBioAIError(
            f"backend onnxruntime-{device} needs ONNX Runtime's {wanted[0]}, which this onnxruntime "
            f"({ort.__version__}) does not have (it has: {', '.join(available)})",
            "pip install 'efficientbioai[gpu]' (onnxruntime-gpu replaces onnxruntime) on a machine with an "
            "NVIDIA GPU, or use backend: onnxruntime (CPU)",
        )
    return [p for p in wanted if p in available]


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"
    precision = "fp32"

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "cpu", gpu_index: int = 0):
        import onnxruntime as ort

        self.threads = threads or default_threads()
        self.device = device
        providers = select_providers(device)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        options = [
            {"device_id": gpu_index} if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else {}
            for p in providers
        ]
        self.session = ort.InferenceSession(str(path), opts, providers=providers, provider_options=options)
        self.providers = self.session.get_providers()
        if device != "cpu":
            self.backend = f"onnxruntime-{device}"
            if PROVIDERS[device][0] not in self.providers:
                raise EfficientBioAIError(
                    f"ONNX Runtime could not start its {PROVIDERS[device][0]} (it fell back to "
                    f"{', '.join(self.providers)}): the CUDA / cuDNN libraries it needs are missing or do not "
                    "match the driver",
                    "install onnxruntime-gpu for your CUDA version, or use backend: torch-cuda",
                )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers}

    def close(self) -> None:
        self.session = None
