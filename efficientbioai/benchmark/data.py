"""Generated benchmark images with ground truth, and a short training run on generated images.

Nothing is downloaded: the images come from :func:`efficientbioai.synthetic.nuclei`. Per task:

* ``restoration``: the input is the noisy image, the target the same image without noise (the generator
  draws the same random numbers whatever the noise level, so both show the same nuclei);
* ``semantic``: the input is the image, the target its foreground mask (uint8);
* ``instance``: the input is the image, the target its label image (int32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from efficientbioai.benchmark.config import GenerateConfig

CALIBRATION_SEED_OFFSET = 1000
TRAIN_SEED_OFFSET = 2000


def generate_pair(spec: GenerateConfig, task: str | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One generated (input, target) pair for ``task``."""
    from efficientbioai.synthetic import nuclei

    if task == "restoration":
        noise = 0.25 if spec.noise is None else spec.noise
        clean, _ = nuclei(spec.shape, density=spec.density, seed=seed, noise=0.0)
        noisy, _ = nuclei(spec.shape, density=spec.density, seed=seed, noise=noise)
        return noisy, clean
    noise = 0.04 if spec.noise is None else spec.noise
    image, labels = nuclei(spec.shape, density=spec.density, seed=seed, noise=noise)
    if task == "instance":
        return image, labels
    return image, (labels > 0).astype(np.uint8)


def image_name(spec: GenerateConfig, seed: int) -> str:
    return f"{spec.generate}{len(spec.shape)}d_{'x'.join(map(str, spec.shape))}_seed{seed}.tif"


def write_generated(
    spec: GenerateConfig, task: str | None, folder: Path, target_folder: Path | None, seed_offset: int = 0
) -> list[tuple[Path, Path | None]]:
    """Write ``spec.count`` generated images (and their targets) as TIFFs; return their paths."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(spec.count):
        seed = spec.seed + seed_offset + k
        image, target = generate_pair(spec, task, seed)
        path = folder / image_name(spec, seed)
        tifffile.imwrite(path, image)
        tpath = None
        if target_folder is not None:
            target_folder.mkdir(parents=True, exist_ok=True)
            tpath = target_folder / path.name
            tifffile.imwrite(tpath, target)
        out.append((path, tpath))
    return out


def default_crop(ndim: int, shape: list[int], tile_shape: list[int] | None) -> list[int]:
    crop = tile_shape or ([128, 128] if ndim == 2 else [16, 64, 64])
    return [min(c, s) for c, s in zip(crop, shape, strict=True)]


def train_module(
    module,
    task: str,
    spec: GenerateConfig,
    *,
    steps: int,
    batch_size: int,
    crop: list[int],
    lr: float,
    images: int,
    seed: int,
    threads: int,
    quiet: bool = False,
):
    """Train ``module`` ((B, 1, *crop) → (B, C, *crop)) on generated images for ``steps`` Adam steps.

    Loss: restoration → mean squared error to the noise-free image; semantic / instance → binary cross
    entropy on the logits plus a soft Dice on their sigmoid (foreground of the nuclei).
    """
    import torch

    from efficientbioai.training import fit, random_crops, soft_dice_loss

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs = [generate_pair(spec, task, spec.seed + TRAIN_SEED_OFFSET + seed + k) for k in range(images)]
    xs_all = [p[0] for p in pairs]
    ys_all = [(p[1] if task == "restoration" else (p[1] > 0)).astype(np.float32) for p in pairs]

    def batches():
        xs, ys = random_crops(rng, xs_all, ys_all, crop, batch_size)
        return torch.from_numpy(xs[:, None]), torch.from_numpy(ys[:, None])

    def loss(out, y):
        if task == "restoration":
            return torch.nn.functional.mse_loss(out, y)
        dice = soft_dice_loss(torch.sigmoid(out), y)
        return torch.nn.functional.binary_cross_entropy_with_logits(out, y) + dice

    fit(module, batches, loss, steps=steps, lr=lr, desc="training on generated images", quiet=quiet)
    return module.eval()
