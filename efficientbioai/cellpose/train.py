"""A brief cellpose training, for tests, benchmarks and examples without downloaded weights.

It is cellpose's own training (``cellpose.train.train_seg``): the targets are cellpose's flows computed
from the label images (``cellpose.dynamics.labels_to_flows``), with cellpose's augmentations and loss.
The result is a model file like the ones cellpose users train, loadable with ``model.kind: cellpose``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from efficientbioai.models.cellpose import require_cellpose

DEFAULT_NBASE = (2, 32, 64, 128, 256)  # cellpose 3's network


def train_cpnet(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    save_path: str | Path,
    *,
    nbase: Sequence[int] = DEFAULT_NBASE,
    epochs: int = 60,
    bsize: int = 96,
    batch_size: int = 8,
    learning_rate: float = 0.02,
    weight_decay: float = 1e-4,
    diam_mean: float = 17.0,
    channels: Sequence[int] = (0, 0),
    seed: int = 0,
    model_name: str = "cellpose_model",
    threads: int | None = None,
) -> Path:
    """Train a cellpose ``CPnet`` from scratch on ``images`` with instance ``labels``; return its file.

    ``epochs`` passes over the images (one optimiser step per ``batch_size`` images and epoch; cellpose
    warms the learning rate up over the first 10 epochs) on random ``bsize`` crops rescaled so that
    objects are ``diam_mean`` pixels across. ``nbase`` sets the width: cellpose's default, or narrower
    for fast tests. A few dozen epochs give a network that finds generated nuclei; it is not a model
    for real data. ``threads``: PyTorch threads while training (restored afterwards); one thread is the
    robust choice on a machine whose cores are busy with other work.
    """
    require_cellpose()
    import torch
    from cellpose import train
    from cellpose.resnet_torch import CPnet

    torch.manual_seed(seed)
    np.random.seed(seed)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    net = CPnet(list(nbase), 3, sz=3, mkldnn=False, diam_mean=float(diam_mean))
    save_path = Path(save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    quiet = contextlib.redirect_stderr(io.StringIO())  # cellpose's progress bars
    level = logging.getLogger("cellpose").level
    logging.getLogger("cellpose").setLevel(logging.WARNING)
    try:
        with quiet:
            path, _, _ = train.train_seg(
                net,
                train_data=[np.asarray(x, np.float32) for x in images],
                train_labels=[np.asarray(y).astype(np.int32) for y in labels],
                channels=list(channels),
                n_epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                weight_decay=weight_decay,
                bsize=bsize,
                min_train_masks=1,
                save_path=str(save_path),
                model_name=model_name,
            )
    finally:
        logging.getLogger("cellpose").setLevel(level)
        torch.set_num_threads(threads_before)
    return Path(path)
