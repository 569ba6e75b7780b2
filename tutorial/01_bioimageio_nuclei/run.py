"""Tutorial 1: a bioimage.io model → int8 engine → a folder of TIFFs → the report (→ bioimage.io again).

python run.py            # full run (minutes)
python run.py --quick    # small images, a check that everything runs
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import tifffile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import SHARED_MODEL, efficientbioai, model_outputs, parse_args, picture, step, write_config  # noqa: E402


def options(p):
    p.add_argument("--model", type=Path, default=SHARED_MODEL, help="a bioimage.io package (folder/zip/yaml)")


def main() -> None:
    args = parse_args(__file__, __doc__, options)
    work = args.workdir
    if not args.model.exists():
        raise SystemExit(
            f"no bioimage.io package at {args.model}: pass --model PATH (a bioimage.io folder, .zip or yaml)"
        )
    from efficientbioai.synthetic import nuclei

    step("1. generate nuclei images (TIFF) with ground-truth masks")
    size, n_images = (256, 1) if args.quick else (512, 4)
    for sub in ("calib", "images", "masks"):
        (work / "data" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(1 if args.quick else 2):
        tifffile.imwrite(work / "data" / "calib" / f"calib{i}.tif", nuclei((size, size), seed=10 + i)[0])
    for i in range(n_images):
        image, labels = nuclei((size, size), seed=100 + i)
        tifffile.imwrite(work / "data" / "images" / f"nuclei{i}.tif", image)
        tifffile.imwrite(work / "data" / "masks" / f"nuclei{i}.tif", (labels > 0).astype(np.uint8))
    print(f"{n_images} images of {size} × {size} in {work / 'data' / 'images'}")

    step("2. compress the model to int8")
    quick = {"calibration": {"num_tiles": 4}, "fidelity": {"num_tiles": 2}, "engine": {"latency_repeats": 2}}
    write_config(
        HERE / "compress.yaml",
        work / "compress.yaml",
        {"model": {"path": str(args.model.resolve())}, **(quick if args.quick else {})},
    )
    efficientbioai("compress", "--config", "compress.yaml", "--quiet", cwd=work, log="compress.txt")

    step("3. run the int8 engine (and the original) over the folder")
    write_config(HERE / "infer.yaml", work / "infer.yaml")
    efficientbioai("infer", "--config", "infer.yaml", "--quiet", cwd=work, log="infer.txt")
    print(f"the artifact's manifest: {work / 'runs' / 'unet2d_int8' / 'manifest.yaml'}")

    step("4. write the compressed model back as a bioimage.io package")
    if importlib.util.find_spec("bioimageio") is None:
        print('skipped: needs bioimageio.spec (pip install "efficientbioai[bioimageio]")')
    else:
        efficientbioai(
            "export-bioimageio", "--artifact", "runs/unet2d_int8", "--output", "runs/unet2d_int8.bioimageio.zip",
            "--overwrite", cwd=work,
        )  # fmt: skip

    step("5. picture: input, original, int8, difference")
    image = tifffile.imread(work / "data" / "images" / "nuclei0.tif")[:256, :256]
    original, compressed = model_outputs(work / "runs" / "unet2d_int8", image[np.newaxis])
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
