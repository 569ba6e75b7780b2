"""PyTorch eager fp32 on CPU: the reference every compressed engine is compared with."""

from __future__ import annotations

import numpy as np

from efficientbioai.engines.base import Engine, default_threads


class TorchEngine(Engine):
    backend = "torch"
    precision = "fp32"

    def __init__(self, module, threads: int | None = None):
        import torch

        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)
        self.module = module.eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().numpy()
