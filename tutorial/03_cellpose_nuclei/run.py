"""Tutorial 3: Cellpose nuclei — train (or bring) a cellpose network, compress it to int8, segment
images with cellpose running the engine, and score the masks (AP) against the ground truth.

    python run.py            # full run (minutes)
    python run.py --quick    # a narrow network, few epochs, one small image: a check that it runs

Needs the cellpose extra: pip install "efficientbioai[cellpose]"
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import efficientbioai, parse_args, picture, step, write_config  # noqa: E402


def main() -> None:
    args = parse_args(__file__, __doc__)
    if importlib.util.find_spec("cellpose") is None:
        raise SystemExit('this tutorial needs cellpose: pip install "efficientbioai[cellpose]"')
    work = args.workdir
    quick = args.quick
    from efficientbioai.cellpose import average_precision, engine_model, original_model, segment, train_cpnet
    from efficientbioai.synthetic import nuclei

    step("1. generate nuclei images with ground-truth labels")
    for sub in ("calib", "images", "labels"):
        (work / "data" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(1 if quick else 2):
        tifffile.imwrite(work / "data" / "calib" / f"calib{i}.tif", nuclei((256, 256), seed=50 + i)[0])
    size, n_images = (256, 1) if quick else (512, 2)
    for i in range(n_images):
        image, labels = nuclei((size, size), seed=300 + i)
        tifffile.imwrite(work / "data" / "images" / f"nuclei{i}.tif", image)
        tifffile.imwrite(work / "data" / "labels" / f"nuclei{i}.tif", labels.astype(np.uint16))
    print(f"{n_images} images of {size} × {size} with their labels in {work / 'data'}")

    step("2. train a cellpose network on generated nuclei (cellpose's own training)")
    train = [nuclei((192, 192), seed=s) for s in range(4 if quick else 8)]
    model_file = train_cpnet(
        [t[0] for t in train], [t[1] for t in train], work / "model",
        nbase=(2, 8, 16, 32, 64) if quick else (2, 16, 32, 64, 128), epochs=3 if quick else 60, diam_mean=17.0,
    )  # fmt: skip
    print(f"cellpose model file: {model_file}")

    step("3. compress the network to int8")
    updates = {"model": {"path": str(model_file)}}
    if quick:
        updates.update(
            calibration={"num_tiles": 4, "tile_shape": [128, 128]},
            fidelity={"num_tiles": 2, "max_pearson_drop": None},
            engine={"latency_repeats": 2},
        )
    write_config(HERE / "compress.yaml", work / "compress.yaml", updates)
    efficientbioai("compress", "--config", "compress.yaml", "--quiet", cwd=work, log="compress.txt")

    step("4. segment the images with cellpose on the int8 engine (and on the original network)")
    write_config(HERE / "infer.yaml", work / "infer.yaml", {"cellpose": {"bsize": 128}} if quick else None)
    efficientbioai("infer", "--config", "infer.yaml", "--quiet", cwd=work, log="infer.txt")

    step("5. picture: input, ground truth, original masks, int8 masks (from Python, cellpose's own eval)")
    image = tifffile.imread(work / "data" / "images" / "nuclei0.tif")[:256, :256]
    truth = tifffile.imread(work / "data" / "labels" / "nuclei0.tif")[:256, :256]
    results = {}
    for name, model in (
        ("original", original_model(work / "runs" / "cellpose_int8")),
        ("int8", engine_model(work / "runs" / "cellpose_int8")),
    ):
        results[name] = segment(model, image, channels=[0, 0], diameter=17)
        ap = average_precision(truth, results[name].masks)
        print(f"{name:>8}: {results[name].count} masks, AP@0.5 {ap['ap50']:.3f} against the ground truth")
    picture(
        work / "picture.png",
        [
            ("input", image, "gray"),
            ("ground truth", truth, "labels"),
            ("original masks", results["original"].masks, "labels"),
            ("int8 masks", results["int8"].masks, "labels"),
        ],
    )


if __name__ == "__main__":
    main()
