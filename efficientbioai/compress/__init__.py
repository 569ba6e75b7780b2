"""Compression: export to ONNX, convert to OpenVINO, quantize, check fidelity (see :func:`compress`)."""

from efficientbioai.compress.pipeline import CompressResult, compress

__all__ = ["CompressResult", "compress"]
