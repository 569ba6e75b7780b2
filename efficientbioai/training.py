"""The one training loop of efficientbioai: Adam over random (input, target) tile batches, with a step cap.

Three small trainings use it: the demo's U-Net (:mod:`efficientbioai.demo`), the benchmark's networks on
generated images (:func:`efficientbioai.benchmark.data.train_module`) and the fine-tuning that recovers
what pruning lost (:func:`efficientbioai.compress.prune.fine_tune`, which adds a cosine learning-rate
schedule and early stopping through ``evaluate``). Callers seed torch and NumPy themselves, so that a
network built after seeding starts from the same weights as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np


def random_crops(
    rng: np.random.Generator,
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray] | None,
    tile: Sequence[int],
    n: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` random crops of shape ``tile`` over the last ``len(tile)`` axes, from randomly drawn images.

    Each crop draws an image index, then a start per cropped axis (axes no larger than the tile start at
    0 and are kept whole). Targets, when given, are cropped where their image is. Returns the stacked
    crops ``(n, *leading axes, *tile)`` and the stacked target crops (or None).
    """
    xs, ts = [], []
    for _ in range(n):
        i = int(rng.integers(len(images)))
        im = images[i]
        cropped = im.shape[im.ndim - len(tile) :]
        start = [int(rng.integers(0, max(1, s - t + 1))) for s, t in zip(cropped, tile, strict=True)]
        sl = (Ellipsis,) + tuple(slice(a, a + t) for a, t in zip(start, tile, strict=True))
        xs.append(im[sl])
        if targets is not None:
            ts.append(targets[i][sl])
    return np.stack(xs), (np.stack(ts) if targets is not None else None)


def soft_dice_loss(p, y):
    """1 − soft Dice of probabilities ``p`` against a binary ``y`` (torch tensors of one shape), smoothed by 1."""
    return 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)


class Evaluation(NamedTuple):
    """What an ``evaluate`` callback of :func:`fit` reports: whether to stop, and what to show."""

    stop: bool = False
    progress: dict[str, str] = {}


def fit(
    module,
    batches: Callable[[], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Any],
    *,
    steps: int,
    lr: float,
    forward: Callable[[Any], Any] | None = None,
    cosine_lr: bool = False,
    evaluate: Callable[[int], Evaluation] | None = None,
    eval_every: int = 1,
    desc: str = "training",
    quiet: bool = False,
) -> int:
    """Train ``module`` in place for at most ``steps`` Adam steps; return the number of steps run.

    Each step draws ``(x, y) = batches()`` (torch tensors), computes ``loss_fn(forward(x), y)``
    (``forward`` defaults to ``module``) and takes one optimiser step at learning rate ``lr`` (annealed
    to 0 over ``steps`` along a cosine with ``cosine_lr``). Every ``eval_every`` steps and at the last
    step, ``evaluate(step)`` may stop training early (:class:`Evaluation`). The module is left in
    training mode; callers switch it to ``eval()``.
    """
    import torch
    from tqdm.auto import tqdm

    forward = forward or module
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if cosine_lr else None
    shown: dict[str, str] = {}
    with tqdm(total=steps, desc=desc, unit="step", disable=quiet, leave=False, file=sys.stderr) as bar:
        for step in range(1, steps + 1):
            module.train()  # an evaluation may have switched it to eval()
            x, y = batches()
            loss = loss_fn(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            bar.update(1)
            if evaluate is not None and (step % eval_every == 0 or step == steps):
                result = evaluate(step)
                shown = dict(result.progress)
                if result.stop:
                    bar.set_postfix(loss=f"{loss.item():.4g}", **shown)
                    return step
            bar.set_postfix(loss=f"{loss.item():.4g}", **shown)
    return steps
