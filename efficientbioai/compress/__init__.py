"""Compression: export to ONNX, prune, quantize, check fidelity, write the artifact (see :func:`compress`).

Where things are:

* ``pipeline``: :func:`compress` runs the steps in order and writes the artifact and its manifest;
* ``calibration``: calibration images (read lazily), the tile shape, the sampled tiles and their split
  into calibration / validation / held-out tiles, running an engine over tiles;
* ``candidates``: one candidate (a network at one precision) built, measured and judged;
* ``strategy``: which candidates are tried (``quantize.strategy``) and which one is kept;
* ``budget`` / ``fidelity``: the accuracy budget (``quantize.max_drop``), the fidelity figures and limits;
* ``export`` (ONNX, OpenVINO IR), ``rewrite`` (exact graph rewrites), ``prune`` (Torch-Pruning and
  fine-tuning), ``quantize`` (NNCF int8), ``trt_graph`` (the ONNX graph at a TensorRT precision) and
  ``tensorrt`` (the TensorRT export target: graph, CPU check, plan): the tools;
* ``tables``: the result as printed in the terminal.
"""

from efficientbioai.compress.pipeline import CompressResult, compress

__all__ = ["CompressResult", "compress"]
