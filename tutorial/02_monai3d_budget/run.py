"""Tutorial 2: train a 3D MONAI UNet on generated volumes, compress it within an accuracy budget
(`quantize.strategy: auto`, with pruning), denoise a zarr volume with the chosen engine.

    python run.py            # full run (minutes)
    python run.py --quick    # a narrow network, few steps, small volumes: a check that everything runs
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import efficientbioai, model_outputs, parse_args, picture, step, write_config  # noqa: E402


def main() -> None:
    args = parse_args(__file__, __doc__)
    work = args.workdir
    import torch
    from monai.networks.nets import UNet

    from efficientbioai.benchmark.config import GenerateConfig
    from efficientbioai.benchmark.data import generate_pair, train_module
    from efficientbioai.engines import default_threads
    from efficientbioai.io import write_image

    quick = args.quick
    step("1. generate noisy nuclei volumes with their noise-free ground truth")
    calib = GenerateConfig(generate="nuclei", shape=[16, 64, 64] if quick else [32, 128, 128], seed=1000)
    (work / "data" / "calib").mkdir(parents=True, exist_ok=True)
    for k in range(1 if quick else 2):
        noisy, _clean = generate_pair(calib, "restoration", calib.seed + k)
        write_image(work / "data" / "calib" / f"calib{k}.tif", noisy)
    volume = GenerateConfig(generate="nuclei", shape=[16, 64, 64] if quick else [32, 192, 192], seed=3000)
    noisy, clean = generate_pair(volume, "restoration", volume.seed)
    write_image(work / "data" / "volume.zarr", noisy)
    write_image(work / "data" / "volume_clean.zarr", clean)
    print(f"test volume {noisy.shape} as zarr: {work / 'data' / 'volume.zarr'}")

    step("2. train a 3D MONAI UNet to denoise them")
    kwargs = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "channels": [8, 16, 32] if quick else [16, 32, 64, 128],
        "strides": [2, 2] if quick else [2, 2, 2],
        "num_res_units": 1,
    }
    net = UNet(**kwargs)
    train_spec = GenerateConfig(generate="nuclei", shape=[32, 96, 96])
    steps = 5 if quick else 150
    tile = [8, 32, 32] if quick else [16, 64, 64]
    net = train_module(
        net, "restoration", train_spec, steps=steps, batch_size=2, lr=3e-3,
        images=2 if quick else 6, seed=0, threads=default_threads(), quiet=True, crop=tile,
    )  # fmt: skip
    (work / "model").mkdir(exist_ok=True)
    torch.save(net.state_dict(), work / "model" / "unet3d.pt")
    print(f"trained {steps} steps: {work / 'model' / 'unet3d.pt'}")

    step("3. compress within the budget: strategy auto tries int8, bf16, fp32, with and without pruning")
    updates = {"model": {"kwargs": kwargs}}
    if quick:
        updates.update(
            calibration={"num_tiles": 4, "tile_shape": tile},
            fidelity={"num_tiles": 2},
            prune={"finetune": {"steps": 2, "val_tiles": 2}},
            engine={"latency_repeats": 2},
        )
    write_config(HERE / "compress.yaml", work / "compress.yaml", updates)
    efficientbioai("compress", "--config", "compress.yaml", "--quiet", cwd=work, log="compress.txt")

    step("4. denoise the zarr volume with the chosen engine, and with the original")
    write_config(
        HERE / "infer.yaml", work / "infer.yaml", {"tiling": {"tile_shape": tile}} if quick else None
    )
    efficientbioai("infer", "--config", "infer.yaml", "--quiet", cwd=work, log="infer.txt")

    step("5. picture: middle z slice of a tile — input, original, compressed, difference")
    crop = noisy[:16, :128, :128] if not quick else noisy[:8, :32, :32]
    original, compressed = model_outputs(work / "runs" / "unet3d_auto", crop[np.newaxis])
    z = crop.shape[0] // 2
    picture(
        work / "picture.png",
        [
            ("input (noisy)", crop[z], "gray"),
            ("original", original[0, z], "gray"),
            ("compressed", compressed[0, z], "same:1"),
            ("compressed - original", compressed[0, z] - original[0, z], "diff"),
        ],
    )


if __name__ == "__main__":
    main()
