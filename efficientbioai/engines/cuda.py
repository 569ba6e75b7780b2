"""NVIDIA GPU engines' common part: device checks, and batch submission that overlaps copies with compute.

A GPU engine implements :meth:`CudaEngine.run_device` (a CUDA float32 tensor in, a CUDA tensor out, on
the stream it is given). :meth:`CudaEngine.map` then pipelines whole images: each batch is copied into
pinned (page-locked) host memory, sent to the GPU on an *upload* stream and brought back on a *download*
stream while other batches compute on the *compute* stream (events order the three), and the caller's
thread reads the next tiles and blends finished outputs meanwhile. Outputs are always synchronised before they are returned, so
a block timed around ``map`` / ``__call__`` ends when the GPU work has.

:class:`TorchCudaEngine` runs the original PyTorch module on the GPU (fp32, or fp16 / bf16 autocast,
channels-last memory format).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from efficientbioai.engines.base import Engine
from efficientbioai.errors import EfficientBioAIError

# where a Linux machine (or container) with an NVIDIA driver shows it: device nodes, the driver's /proc
# entry, or WSL2's GPU paravirtualisation device
NVIDIA_SIGNS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg")


def no_nvidia_driver() -> bool:
    """True when this is a Linux machine with no sign of an NVIDIA driver (see :data:`NVIDIA_SIGNS`), so
    CUDA cannot work; False when there may be one (then only PyTorch can tell)."""
    import os
    import sys

    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in NVIDIA_SIGNS)


def cuda_available() -> bool:
    """Whether PyTorch sees an NVIDIA GPU (False without torch's CUDA build or a driver).

    On a Linux machine without an NVIDIA driver the answer is known without importing torch, which takes
    one to two seconds of every ``infer`` run on a CPU machine.
    """
    if no_nvidia_driver():
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def require_cuda(what: str, index: int = 0):
    """The ``torch.device`` of GPU ``index``, or a clear error naming what is missing."""
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda
        why = (
            f"PyTorch {torch.__version__} is a CPU-only build"
            if build is None
            else f"PyTorch {torch.__version__} (CUDA {build}) finds no NVIDIA GPU / driver on this machine"
        )
        raise EfficientBioAIError(
            f"{what} needs an NVIDIA GPU with CUDA: {why}",
            "run on a machine with an NVIDIA GPU and driver, with PyTorch's CUDA build "
            "(pip install torch --index-url https://download.pytorch.org/whl/cu128) and "
            "pip install 'efficientbioai[gpu]'; or use backend: openvino (CPU)",
        )
    if index >= torch.cuda.device_count():
        raise EfficientBioAIError(
            f"{what}: GPU {index} does not exist (this machine has {torch.cuda.device_count()})",
            "set gpu.index to one of the GPUs nvidia-smi lists (CUDA_VISIBLE_DEVICES renumbers them)",
        )
    return torch.device("cuda", index)


def gpu_description(index: int = 0) -> dict[str, Any]:
    """Name and compute capability of a CUDA device, as recorded in manifests and reports."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


class CudaEngine(Engine):
    """Base of the GPU engines: host ↔ device copies, streams, pipelining; subclasses run the network."""

    device: Any = None
    index: int = 0

    def _streams(self):
        """(upload, compute, download) streams: uploads and downloads use the GPU's two copy engines, so
        batch k+1's upload and batch k-1's download both overlap batch k's compute."""
        import torch

        if getattr(self, "_compute", None) is None:
            self._upload = torch.cuda.Stream(self.device)
            self._compute = torch.cuda.Stream(self.device)
            self._download = torch.cuda.Stream(self.device)
        return self._upload, self._compute, self._download

    def run_device(self, x, stream):  # pragma: no cover - abstract, GPU only
        """Run the network on ``x`` (float32, CUDA, (B, C, *spatial)) on ``stream``; return a CUDA tensor."""
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return next(iter(self.map([batch], depth=1)))

    def map(self, batches: Iterable[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
        """Outputs of ``batches`` in order; batch k+1's upload overlaps batch k's compute and download."""
        import torch

        upload, compute, download = self._streams()
        pending: deque = deque()

        def submit(batch: np.ndarray):
            host = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).pin_memory()
            with torch.cuda.stream(upload):
                x = host.to(self.device, non_blocking=True)
                uploaded = torch.cuda.Event()
                uploaded.record(upload)
            with torch.cuda.stream(compute):
                compute.wait_event(uploaded)
                x.record_stream(compute)  # allocated on the upload stream, read on this one
                y = self.run_device(x, compute)
                computed = torch.cuda.Event()
                computed.record(compute)
            with torch.cuda.stream(download):
                download.wait_event(computed)
                y.record_stream(download)
                out = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
                out.copy_(y, non_blocking=True)
                done = torch.cuda.Event()
                done.record(download)
            return host, out, done  # host stays referenced until its upload has finished

        def finish(item) -> np.ndarray:
            _host, out, done = item
            done.synchronize()
            return out.float().numpy().copy() if out.dtype != torch.float32 else out.numpy().copy()

        for batch in batches:
            pending.append(submit(batch))
            if len(pending) >= max(1, depth):
                yield finish(pending.popleft())
        while pending:
            yield finish(pending.popleft())

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.device is not None:
            d.update(device=f"cuda:{self.index}", gpu=gpu_description(self.index))
        return d


class TorchCudaEngine(CudaEngine):
    """The original PyTorch module on an NVIDIA GPU: fp32, or fp16 / bf16 autocast, channels-last."""

    backend = "torch-cuda"

    def __init__(self, module, precision: str = "fp16", index: int = 0, channels_last: bool = True):
        import torch

        if precision not in ("fp32", "fp16", "bf16"):
            raise EfficientBioAIError(
                f"torch-cuda runs fp32, fp16 or bf16, not {precision!r}", "set gpu.torch_precision"
            )
        self.device = require_cuda("backend torch-cuda", index)
        self.index = index
        self.precision = precision
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.channels_last = channels_last
        self.module = module.to(self.device).eval()
        self._format = None
        if channels_last:
            # channels_last is (N, ..., C) in memory: the layout cuDNN's tensor-core kernels prefer
            self._format = {4: torch.channels_last, 5: torch.channels_last_3d}
            first = next((p for p in self.module.parameters() if p.dim() in (4, 5)), None)
            try:
                if first is not None:
                    self.module = self.module.to(memory_format=self._format[first.dim()])
            except RuntimeError:  # 2D and 3D weights mixed: leave the layout alone
                self._format = None
                self.channels_last = False
        self.threads = torch.get_num_threads()
        self.label = f"torch cuda {precision}" + (" autocast" if self.dtype is not None else "")

    def run_device(self, x, stream):
        import torch

        if self._format is not None and x.dim() in self._format:
            x = x.contiguous(memory_format=self._format[x.dim()])
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=self.dtype or torch.float16, enabled=self.dtype is not None),
        ):
            out = self.module(x)
        if isinstance(out, tuple | list):
            out = out[0]
        return out.float().contiguous()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "autocast": self.dtype is not None, "channels_last": self.channels_last}

    def close(self) -> None:
        self.module = None
