"""How efficientbioai loads our network: a BaseParser subclass, named in the config as
``model.kind: "mylab.parsers:NucleiNetParser"``. Nothing in efficientbioai changes."""

from __future__ import annotations

import torch

from efficientbioai.errors import ModelLoadError
from efficientbioai.models import BaseParser, LoadedModel
from mylab.nets import NucleiNet


class NucleiNetParser(BaseParser):
    """Our checkpoints hold {"config": {"width": ...}, "model": state dict, "steps": ...}."""

    def load(self) -> LoadedModel:
        if self.config.checkpoint is None:
            raise ModelLoadError("model.checkpoint: give the .pt file our training script wrote")
        ckpt = torch.load(self.config.checkpoint, map_location="cpu", weights_only=True)
        net = NucleiNet(**ckpt["config"])
        net.load_state_dict(ckpt["model"])
        return LoadedModel(
            module=net.eval(),
            axes="bcyx",  # (B, C, Y, X), float32
            name=f"mylab NucleiNet (width {ckpt['config']['width']}, {ckpt['steps']} steps)",
            # the same normalisation as in training, recorded in the artifact so that `infer` applies it
            preprocessing=[
                {"id": "scale_range", "kwargs": {"min_percentile": 1, "max_percentile": 99.8, "axes": "yx"}}
            ],
            postprocessing=[{"id": "sigmoid"}],  # logits → foreground probability
            halo=[8, 8],  # border pixels of a tile not to trust
            tile_step=[4, 4],  # two poolings: sizes must be multiples of 4 (probed when left out)
            source={"weights_file": str(self.config.checkpoint)},  # reported and checksummed in the manifest
        )

    def calibration_tiles(self, tiles):
        """Calibrate on tiles that show nuclei, not on empty background."""
        busy = [t for t in tiles if t.std() > 0.05]
        return busy or tiles
