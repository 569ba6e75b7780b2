"""Training the configured network briefly on generated images, for benchmarks that run with no files."""

from __future__ import annotations

from pathlib import Path

from efficientbioai.benchmark.config import GenerateConfig, TrainConfig
from efficientbioai.config import ModelConfig


def train_model(
    model: ModelConfig,
    task: str,
    images: GenerateConfig,
    train: TrainConfig,
    tile_shape: list[int] | None,
    out: Path,
    *,
    threads: int,
    quiet: bool,
) -> Path:
    """Train ``model`` on images generated like ``images`` (crops of ``train.crop``, else of the tile
    shape) and save its weights as OUTPUT/model/weights.pt, the checkpoint every variant starts from."""
    import torch

    from efficientbioai.benchmark.data import default_crop, train_module
    from efficientbioai.models import load_model

    crop = train.crop or default_crop(len(images.shape), images.shape, tile_shape)
    _, loaded = load_model(model)
    module = train_module(
        loaded.module,
        task,
        images,
        steps=train.steps,
        batch_size=train.batch_size,
        crop=crop,
        lr=train.lr,
        images=train.images,
        seed=train.seed,
        threads=threads,
        quiet=quiet,
    )
    path = out / "model" / "weights.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path
