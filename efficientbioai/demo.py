"""``efficientbioai demo``: the whole workflow on a fresh machine, with no files of the user.

1. generate nuclei images with ground truth (:mod:`efficientbioai.synthetic`);
2. train a small 2D U-Net (MONAI) on them for ~30 s — quantization is judged on a trained
   network, never on random weights, whose outputs hide what int8 does to real features;
3. ``compress`` it to an int8 OpenVINO engine, calibrated and checked on generated images;
4. ``infer`` over a generated 2048 × 2048 image with the int8 engine and the original PyTorch model, side
   by side: whole-image latency, energy, Dice / IoU against the ground truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

DEMO_TRAIN_STEPS = 700  # about 30 s on 2 cores; a fixed count keeps the demo reproducible


def demo_unet():
    """The demo network: a MONAI 2D U-Net (16–128 channels) followed by a sigmoid (foreground probability)."""
    import torch
    from monai.networks.nets import UNet

    return torch.nn.Sequential(
        UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            channels=(16, 32, 64, 128),
            strides=(2, 2, 2),
            num_res_units=1,
        ),
        torch.nn.Sigmoid(),
    )


def train(images, masks, steps: int = DEMO_TRAIN_STEPS, seed: int = 0, quiet: bool = False):
    """Train :func:`demo_unet` on random 128 × 128 crops (BCE + soft Dice) for ``steps`` steps."""
    import torch

    from efficientbioai.training import fit, random_crops, soft_dice_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = demo_unet()
    crop, batch = (128, 128), 8

    def batches():
        xs, ys = random_crops(rng, images, masks, crop, batch)
        return torch.from_numpy(xs[:, None]), torch.from_numpy(ys[:, None].astype(np.float32))

    def loss(p, y):
        p = p.clamp(1e-6, 1 - 1e-6)
        return torch.nn.functional.binary_cross_entropy(p, y) + soft_dice_loss(p, y)

    fit(net, batches, loss, steps=steps, lr=3e-3, desc="training the demo U-Net", quiet=quiet)
    return net.eval()


def run_demo(
    output: str | Path = "runs/demo", quiet: bool = False, train_steps: int = DEMO_TRAIN_STEPS
) -> str:
    """Run the demo under ``output`` and return the printed report."""
    import tifffile
    import torch

    from efficientbioai.compress import compress
    from efficientbioai.config import CompressConfig, InferConfig, validate_config
    from efficientbioai.infer import infer
    from efficientbioai.synthetic import nuclei

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    out = Path(output).expanduser()
    data = out / "data"
    for sub in ("train", "calib", "calib_masks", "test", "test_masks"):
        (data / sub).mkdir(parents=True, exist_ok=True)

    log("demo [1/4] generating nuclei images with ground truth")
    train_images, train_masks = [], []
    for i in range(6):
        im, lab = nuclei((384, 384), seed=100 + i)
        train_images.append(im)
        train_masks.append(lab > 0)
    for i in range(2):
        im, lab = nuclei((512, 512), seed=200 + i)
        tifffile.imwrite(data / "calib" / f"calib{i}.tif", im)
        tifffile.imwrite(data / "calib_masks" / f"calib{i}.tif", (lab > 0).astype(np.uint8))
    im, lab = nuclei((2048, 2048), seed=300)
    tifffile.imwrite(data / "test" / "nuclei_2048.tif", im)
    tifffile.imwrite(data / "test_masks" / "nuclei_2048.tif", (lab > 0).astype(np.uint8))

    log(f"demo [2/4] training a small U-Net on them ({train_steps} steps)")
    net = train(train_images, train_masks, steps=train_steps, quiet=quiet)
    (out / "model").mkdir(exist_ok=True)
    checkpoint = out / "model" / "demo_unet.pt"
    torch.save(net.state_dict(), checkpoint)

    log("demo [3/4] compressing it to int8 (OpenVINO + NNCF)")
    ccfg = validate_config(
        {
            "model": {
                "kind": "torch",
                "factory": "efficientbioai.demo:demo_unet",
                "checkpoint": str(checkpoint),
                "axes": "bcyx",
            },
            "calibration": {
                "images": str(data / "calib"),
                "targets": str(data / "calib_masks"),
                "num_tiles": 32,
                "tile_shape": [256, 256],
            },
            "quantize": {"precision": "int8"},
            "fidelity": {"task": "semantic", "max_pearson_drop": 0.02},
            "output": str(out / "unet2d_int8"),
            "overwrite": True,
        },
        CompressConfig,
        source="demo",
    )
    compressed = compress(ccfg, quiet=quiet)

    log("demo [4/4] running the int8 engine and the original model over a 2048 × 2048 image")
    icfg = validate_config(
        {
            "model": str(out / "unet2d_int8"),
            "input": str(data / "test"),
            "output": str(out / "predictions"),
            "targets": str(data / "test_masks"),
            "task": "semantic",
            "tiling": {"tile_shape": [256, 256], "overlap": 0.25},
            "compare_with_original": True,
            "overwrite": True,
        },
        InferConfig,
        source="demo",
    )
    result = infer(icfg, quiet=quiet)
    return "\n\n".join(
        [
            "compress (per 256 × 256 tile, on held-out tiles):\n" + compressed.table(),
            "infer (whole 2048 × 2048 image, against its ground truth):\n" + result.table(),
            f"files: {out} (predictions in {out / 'predictions'}); "
            "configs like these run your own models: see configs/ and the README",
        ]
    )
