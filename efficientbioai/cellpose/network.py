"""The exportable form of a cellpose ``CPnet``, and the stand-in that lets cellpose run our engines."""

from __future__ import annotations

import time

import numpy as np
import torch

from efficientbioai.errors import EfficientBioAIError

STYLE_CHANNELS = 256  # cellpose.core.run_net allocates 256-wide styles


class CellposeFlows(torch.nn.Module):
    """A cellpose ``CPnet`` that returns only its (B, 3, Y, X) map: Y flow, X flow, cell probability.

    The sub-modules and weights are cellpose's own (``self.net`` is the ``CPnet``). Only the style
    pooling differs from ``CPnet.forward``: a mean over the spatial axes instead of ``avg_pool2d`` with an
    input-sized kernel. It is the same value, but it exports as ``ReduceMean``, valid for every tile
    shape (the average pool hard-codes the traced tile). ``in_channels`` is 1 when the zero nucleus
    channel of ``channels: [c, 0]`` is folded into the network, else the network's channel count.
    """

    def __init__(self, net, in_channels: int | None = None):
        super().__init__()
        self.net = net
        self.nchan = int(net.nbase[0])
        self.in_channels = int(in_channels or self.nchan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels < self.nchan:
            pad = x.new_zeros((x.shape[0], self.nchan - self.in_channels, *x.shape[2:]))
            x = torch.cat([x, pad], dim=1)
        features = self.net.downsample(x)
        style = features[-1].mean(dim=tuple(range(2, features[-1].ndim)))
        style = style / torch.sum(style**2, dim=1, keepdim=True) ** 0.5
        if not self.net.style_on:
            style = style * 0
        return self.net.output(self.net.upsample(style, features, False))


class EngineNet:
    """Stands in for ``CellposeModel.net``: cellpose's ``run_net`` hands it batches of tiles.

    ``cellpose.core._forward`` converts each batch to a CPU tensor, calls ``net(X)`` and reads back the
    flows and the style. The flows come from ``engine`` (any :class:`efficientbioai.engines.Engine`);
    the engine has no style output, so the style is NaN (cellpose only uses it to estimate diameters with
    its size model). ``seconds`` and ``tiles`` add up the engine's own time and work.
    """

    nout = 3
    mkldnn = False

    def __init__(self, engine, *, nchan: int, in_channels: int, diam_mean: float, diam_labels: float):
        self.engine = engine
        self.nchan = nchan
        self.in_channels = in_channels
        self.device = torch.device("cpu")
        self.diam_mean = torch.nn.Parameter(torch.tensor([float(diam_mean)]), requires_grad=False)
        self.diam_labels = torch.nn.Parameter(torch.tensor([float(diam_labels)]), requires_grad=False)
        self.seconds = 0.0
        self.tiles = 0

    def eval(self) -> EngineNet:
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.detach().cpu().numpy()
        if batch.shape[1] > self.in_channels:
            if np.any(batch[:, self.in_channels :]):
                raise EfficientBioAIError(
                    "this engine was compressed for one channel (cellpose channels [c, 0]) but the "
                    "nucleus channel is not empty",
                    "run it with channels [c, 0], or compress the model with model.options.channels "
                    "[c, n] to use a nucleus channel",
                )
            batch = batch[:, : self.in_channels]
        t0 = time.perf_counter()
        flows = self.engine(np.ascontiguousarray(batch, dtype=np.float32))
        self.seconds += time.perf_counter() - t0
        self.tiles += len(batch)
        style = np.full((len(batch), STYLE_CHANNELS), np.nan, np.float32)
        return torch.from_numpy(np.asarray(flows, np.float32)), torch.from_numpy(style)


class TorchNet(torch.nn.Module):
    """The original ``CPnet`` for cellpose's ``run_net``, timed; styles narrower than 256 are zero-padded.

    Cellpose's own models all have 256-wide styles; networks with fewer channels in their last level
    (small test networks) would not fit ``run_net``'s style buffer otherwise. ``mkldnn`` is cellpose's
    CPU default: ``cellpose.core._forward`` converts this module (so the ``CPnet`` inside) to MKL-DNN.
    """

    def __init__(self, net, mkldnn: bool = False):
        super().__init__()
        self.net = net
        self.nout = int(net.nout)
        self.mkldnn = bool(mkldnn)
        self.net.mkldnn = self.mkldnn
        self.diam_mean = net.diam_mean
        self.diam_labels = net.diam_labels
        self.seconds = 0.0
        self.tiles = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x: torch.Tensor):
        t0 = time.perf_counter()
        y, style = self.net(x)[:2]
        if style.shape[1] < STYLE_CHANNELS:
            style = torch.nn.functional.pad(style, (0, STYLE_CHANNELS - style.shape[1]))
        self.seconds += time.perf_counter() - t0
        self.tiles += len(x)
        return y, style
