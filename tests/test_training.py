"""The shared training loop (efficientbioai.training): crops, step cap, early stop through evaluate."""

import numpy as np
import torch
from torch import nn

from efficientbioai.training import Evaluation, fit, random_crops


def test_random_crops_cut_images_and_targets_at_the_same_place():
    rng = np.random.default_rng(0)
    images = [np.arange(2 * 20 * 30, dtype=np.float32).reshape(2, 20, 30) for _ in range(3)]
    targets = [im[:1] * 10 for im in images]
    xs, ts = random_crops(rng, images, targets, (8, 30), 5)
    assert xs.shape == (5, 2, 8, 30) and ts.shape == (5, 1, 8, 30)
    np.testing.assert_array_equal(ts, xs[:, :1] * 10)
    # an axis no larger than the tile is kept whole: all crops start at x = 0
    assert (xs[:, 0, 0, 0] % 30 == 0).all()
    # without a channel axis (the demo's 2D images), and without targets
    xs, ts = random_crops(rng, [np.zeros((16, 16))], None, (4, 4), 2)
    assert xs.shape == (2, 4, 4) and ts is None


def test_fit_learns_and_stops_when_evaluate_says_so():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(4, 1, 8, 8)
    y = 2 * x

    def batches():
        return x, y

    def loss():
        with torch.no_grad():
            return nn.functional.mse_loss(net(x), y).item()

    before = loss()
    assert fit(net, batches, nn.functional.mse_loss, steps=60, lr=5e-2, quiet=True) == 60
    assert loss() < before / 2

    seen = []

    def evaluate(step):
        seen.append(step)
        return Evaluation(stop=step >= 15, progress={"step": str(step)})

    ran = fit(
        net, batches, nn.functional.mse_loss, steps=100, lr=1e-2, evaluate=evaluate, eval_every=5, quiet=True
    )
    assert ran == 15 and seen == [5, 10, 15]
    # the last step is always evaluated, whether or not it is a multiple of eval_every
    seen.clear()
    fit(net, batches, nn.functional.mse_loss, steps=7, lr=1e-2, evaluate=evaluate, eval_every=5, quiet=True)
    assert seen == [5, 7]
