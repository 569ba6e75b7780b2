"""Shared test fixtures: generated images and tiny real networks (nothing is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "unet2d_nuclei_broad"
REPO = Path(__file__).resolve().parents[1]


def blobs(
    shape: tuple[int, ...], n: int = 12, seed: int = 0, noise: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-like image of gaussian nuclei on a dark background, and its foreground mask."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    img = np.zeros(shape, np.float32)
    for _ in range(n):
        c = [rng.uniform(0.15 * s, 0.85 * s) for s in shape]
        r = rng.uniform(0.04, 0.08) * min(shape[-2:])
        d2 = sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True))
        img += np.exp(-d2 / (2 * r * r)).astype(np.float32)
    mask = img > 0.5
    img = img + noise * rng.standard_normal(shape).astype(np.float32) + 0.1
    return img.astype(np.float32), mask


@pytest.fixture
def shared_model() -> Path:
    if not (SHARED_MODEL / "bioimageio.yaml").is_file():
        pytest.skip("../shared/models/unet2d_nuclei_broad is not present (only in the project's workspace)")
    return SHARED_MODEL


def tiny_unet(ndim: int):
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(
        spatial_dims=ndim, in_channels=1, out_channels=1, channels=(4, 8, 16), strides=(2, 2), num_res_units=1
    ).eval()


TINY_UNET_KWARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}


@pytest.fixture
def images3d(tmp_path) -> Path:
    folder = tmp_path / "calib3d"
    folder.mkdir()
    for i in range(2):
        img, _ = blobs((24, 64, 64), n=8, seed=i)
        tifffile.imwrite(folder / f"vol{i}.tif", img)
    return folder


@pytest.fixture
def images2d(tmp_path) -> tuple[Path, Path]:
    imgs, masks = tmp_path / "img2d", tmp_path / "mask2d"
    imgs.mkdir()
    masks.mkdir()
    for i in range(2):
        img, mask = blobs((96, 96), n=10, seed=10 + i)
        tifffile.imwrite(imgs / f"im{i}.tif", img)
        tifffile.imwrite(masks / f"im{i}.tif", mask.astype(np.uint8))
    return imgs, masks


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "efficientbioai", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
