"""Tutorial 4: your own PyTorch network through a custom parser (mylab/parsers.py) → int8 → inference.

python run.py            # full run (minutes)
python run.py --quick    # few training steps, small images: a check that everything runs
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))  # mylab, for the training below
from _common import efficientbioai, model_outputs, parse_args, picture, step, write_config  # noqa: E402


def train(net, images, masks, steps: int, seed: int = 0):
    """Our lab's training loop: BCE + soft Dice on random 128 × 128 crops."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(8):
            i = int(rng.integers(len(images)))
            y0, x0 = (int(rng.integers(0, s - 128 + 1)) for s in images[i].shape)
            xs.append(images[i][y0 : y0 + 128, x0 : x0 + 128])
            ys.append(masks[i][y0 : y0 + 128, x0 : x0 + 128])
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys)[:, None].astype(np.float32))
        logits = net(x)
        p = torch.sigmoid(logits)
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            + 1
            - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def normalise(image):
    lo, hi = np.percentile(image, [1, 99.8])
    return ((image - lo) / (hi - lo + 1e-6)).astype(np.float32)


def main() -> None:
    args = parse_args(__file__, __doc__)
    work, quick = args.workdir, args.quick
    import torch
    from mylab.nets import NucleiNet

    from efficientbioai.synthetic import nuclei

    step("1. generate nuclei images with ground-truth masks")
    for sub in ("calib", "images", "masks"):
        (work / "data" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(1 if quick else 2):
        tifffile.imwrite(work / "data" / "calib" / f"calib{i}.tif", nuclei((256, 256), seed=20 + i)[0])
    size, n_images = (256, 1) if quick else (512, 2)
    for i in range(n_images):
        image, labels = nuclei((size, size), seed=400 + i)
        tifffile.imwrite(work / "data" / "images" / f"nuclei{i}.tif", image)
        tifffile.imwrite(work / "data" / "masks" / f"nuclei{i}.tif", (labels > 0).astype(np.uint8))

    step("2. train our own network and save it the way our lab does (weights + training config)")
    data = [nuclei((256, 256), seed=s) for s in range(2 if quick else 4)]
    steps = 5 if quick else 100
    net = train(NucleiNet(width=16), [normalise(d[0]) for d in data], [d[1] > 0 for d in data], steps)
    (work / "model").mkdir(exist_ok=True)
    torch.save(
        {"config": {"width": 16}, "model": net.state_dict(), "steps": steps}, work / "model" / "nucleinet.pt"
    )

    # mylab must be importable by the `efficientbioai` command: put its folder on PYTHONPATH
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)

    step("3. compress through the custom parser")
    quick_updates = {
        "calibration": {"num_tiles": 4},
        "fidelity": {"num_tiles": 2, "max_pearson_drop": None},
        "engine": {"latency_repeats": 2},
    }
    write_config(HERE / "compress.yaml", work / "compress.yaml", quick_updates if quick else None)
    efficientbioai("compress", "--config", "compress.yaml", "--quiet", cwd=work, log="compress.txt")

    step("4. run the int8 engine over the images, the original side by side")
    write_config(HERE / "infer.yaml", work / "infer.yaml")
    efficientbioai("infer", "--config", "infer.yaml", "--quiet", cwd=work, log="infer.txt")

    step("5. picture: input, original, int8, difference")
    image = tifffile.imread(work / "data" / "images" / "nuclei0.tif")[:256, :256]
    original, compressed = model_outputs(work / "runs" / "nucleinet_int8", image[np.newaxis])
    picture(
        work / "picture.png",
        [
            ("input", image, "gray"),
            ("original", original[0], "gray"),
            ("int8", compressed[0], "same:1"),
            ("int8 - original", compressed[0] - original[0], "diff"),
        ],
    )


if __name__ == "__main__":
    main()
