"""CPU benchmark: every model the project can get, compressed with defaults and run over a whole image.

Rows (one per model; a failure in one row never stops the table):
  1. the real bioimage.io package ../shared/models/unet2d_nuclei_broad (``--shared``), calibrated on its own
     test tensors (16 tiles of 256x256) and run on its 512x512 test input saved as a TIFF; the original is
     its TorchScript model loaded by ``efficientbioai.models.load_model``, with the package's pre- and
     post-processing (``efficientbioai.processing.apply_steps``). "not present" where the folder is absent;
  2. each network of tests/test_model_outputs.py (model kind ``torch``, factory
     ``tests.test_model_outputs:make_*``, axes bcyx, fixed seeds): TwoHeads (a tuple of two heads),
     HalfAndFull (a dict with a half-size output), SuperRes (2x), Valid (valid convolutions, 4 px border),
     WithStyle (maps and a per-image style vector, compressed with ``drop_outputs: [output1]``) and
     TwoInputs (``forward(image, mask)``: refused, the refusal is shown). Calibrated on 4 generated
     512x512 images (``efficientbioai.synthetic.nuclei``, tiles of 64x64), run on one 1024x1024 image;
  3. a 5-level 3D MONAI UNet (channels 8..256, strides 2x5, so tiles are multiples of 32; random weights
     (torch.manual_seed(0)) saved as its checkpoint, so that compress and infer's backend torch load the
     same network; batch norm instead of MONAI's default instance norm, which normalises each tile by
     its own statistics, so that no tiling could match the whole-volume run),
     calibrated on two generated 64x128x128 volumes (tiles of 32x64x64), run on a 64x256x256 volume.

Everything is compressed with defaults (int8, the default accuracy budget, default tile counts); only the
calibration images and tile shape, and the engine threads and latency repeats (2, timing only) are set.
Each artifact then runs ``efficientbioai.infer`` twice on the whole image, same tiling, ``--threads``
threads: backend openvino (the compressed engine) and backend torch (the original PyTorch model, fp32
eager). Columns: which precision compress built, the outputs' names, the Pearson r of each written output
file vs the original network run by PyTorch on the whole image at once (openvino and, to tell tiling
from quantisation, torch through the same tiling), the whole-image seconds of each backend (tiles read
to stitched output, after infer's untimed warm-up, one run) and the speed-up; "note" holds the error's
message (``problem``) where a step failed.

Run:  python benchmarks/models_cpu.py [--shared DIR] [--threads 2] [--quick] [--keep]
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # tests.test_model_outputs holds the networks' factories
    sys.path.insert(0, str(REPO))

from efficientbioai import cpu  # noqa: E402
from efficientbioai.tables import table  # noqa: E402

DEFAULT_SHARED = REPO.parent / "shared" / "models" / "unet2d_nuclei_broad"
TEST_NETWORKS = [  # (row label, factory, extra model keys, expected to be refused)
    ("TwoHeads (tuple of 2)", "make_two_heads", {}, False),
    ("HalfAndFull (dict, 1/2)", "make_half_and_full", {}, False),
    ("SuperRes (2x)", "make_super_res", {}, False),
    ("Valid (border 4)", "make_valid", {}, False),
    ("WithStyle (drop style)", "make_with_style", {"drop_outputs": ["output1"]}, False),
    ("TwoInputs", "make_two_inputs", {}, True),
]
UNET3D = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [8, 16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2, 2],
    "norm": "batch",
}


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    import nncf

    nncf.set_log_level(logging.ERROR)


def message(exc: BaseException) -> str:
    """The error's ``problem`` (an EfficientBioAIError), else its type and first line."""
    problem = getattr(exc, "problem", None)
    if problem:
        return str(problem)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


# ------------------------------------------------------------------------------------ the images


def write_tif(path: Path, array: np.ndarray) -> Path:
    import tifffile

    tifffile.imwrite(path, np.asarray(array, np.float32))
    return path


def make_images(work: Path, quick: bool) -> dict[str, Path]:
    """Calibration folders and whole images for the 2D networks and the 3D UNet."""
    from efficientbioai.synthetic import nuclei

    n2, s2, whole2 = (2, 256, 512) if quick else (4, 512, 1024)
    whole3 = (64, 128, 128) if quick else (64, 256, 256)
    (work / "calib2d").mkdir()
    (work / "calib3d").mkdir()
    for i in range(n2):
        write_tif(work / "calib2d" / f"img{i}.tif", nuclei((s2, s2), seed=i)[0])
    for i in range(2):
        write_tif(work / "calib3d" / f"vol{i}.tif", nuclei((64, 128, 128), seed=10 + i)[0])
    return {
        "calib2d": work / "calib2d",
        "calib3d": work / "calib3d",
        "whole2d": write_tif(work / f"whole2d_{whole2}.tif", nuclei((whole2, whole2), seed=100)[0]),
        "whole3d": write_tif(work / "whole3d.tif", nuclei(whole3, seed=101)[0]),
    }


# ------------------------------------------------------------------------------------ references


def torch_outputs(net, image: np.ndarray, given: list[str] | None) -> dict[str, np.ndarray]:
    """The network's outputs on the whole image (batch and a single channel dropped), by output name."""
    import torch

    from efficientbioai.models.outputs import flatten_outputs, output_names

    with torch.inference_mode():
        out = net.eval()(torch.from_numpy(np.asarray(image, np.float32)[None, None]))
    parts = flatten_outputs(out)
    names = output_names(out, len(parts), given)
    arrays = [p.numpy()[0] for p in parts]
    return {n: a[0] if a.shape[0] == 1 else a for n, a in zip(names, arrays, strict=True)}


def bioimageio_reference(cfg, manifest, raw: np.ndarray) -> dict[str, np.ndarray]:
    """The package's TorchScript model on the whole test input, with its pre- and post-processing."""
    import torch

    from efficientbioai.models import load_model
    from efficientbioai.processing import apply_steps

    _, loaded = load_model(cfg.model)
    axes = manifest.input.axes
    x = apply_steps(raw.astype(np.float32), manifest.input.preprocessing, axes)
    with torch.inference_mode():
        y = loaded.module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    y = apply_steps(y, manifest.output.postprocessing, axes)[0]
    return {manifest.output.names()[0]: y[0] if y.shape[0] == 1 else y}


def package_test_input(folder: Path) -> np.ndarray:
    """The bioimage.io package's test input tensor (as named in its bioimageio.yaml / rdf.yaml)."""
    import yaml

    rdf = next(p for p in (folder / "bioimageio.yaml", folder / "rdf.yaml") if p.is_file())
    spec = yaml.safe_load(rdf.read_text())
    inp = spec["inputs"][0]
    source = (inp.get("test_tensor") or {}).get("source") if isinstance(inp, dict) else None
    if source is None:  # format 0.4: a list of test_inputs at the top level
        source = spec["test_inputs"][0]
    return np.load(folder / source)


# ------------------------------------------------------------------------------------ one row


def run_infer(artifact: Path, image: Path, out: Path, backend: str, threads: int):
    from efficientbioai.config import InferConfig, validate_config
    from efficientbioai.infer import infer

    cfg = {
        "model": str(artifact),
        "input": str(image),
        "output": str(out),
        "backend": backend,
        "threads": threads,
        "energy": False,
        "overwrite": True,
    }
    icfg = validate_config(cfg, InferConfig)
    result = infer(icfg, quiet=True)
    return icfg, result.images[0].runs[0].seconds


def read_outputs(icfg, image: Path, manifest) -> dict[str, np.ndarray]:
    """The files infer wrote for ``image``, by output name."""
    import tifffile

    from efficientbioai.infer.images import output_files, output_paths

    files = output_files(output_paths(icfg, [image])[0], manifest.output)
    names = [o["name"] for o in manifest.output.outputs] if len(files) > 1 else manifest.output.names()[:1]
    return {n: np.asarray(tifffile.imread(f), np.float32) for n, f in zip(names, files, strict=True)}


def pearsons(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str:
    from efficientbioai.metrics import pearson

    cells = []
    for name, g in got.items():
        w = want.get(name)
        if w is None and len(got) == len(want) == 1:  # one output: whatever each side calls it
            w = next(iter(want.values()))
        if w is None or w.shape != g.shape:
            cells.append(f"{name} shape {g.shape} vs {None if w is None else w.shape}")
        else:
            cells.append(f"{name} {pearson(g, w):.4f}" if len(got) > 1 else f"{pearson(g, w):.4f}")
    return ", ".join(cells)


def run_row(label: str, raw_cfg: dict, image: Path, reference, work: Path, threads: int, bugs: list) -> list:
    """Compress, infer with openvino and torch, compare with the original: one table row."""
    from efficientbioai.compress import compress
    from efficientbioai.config import validate_config
    from efficientbioai.errors import EfficientBioAIError

    row = {"model": label, "compress": "failed"}
    stage = "compress"
    try:
        cfg = validate_config(raw_cfg)
        t0 = time.perf_counter()
        result = compress(cfg, quiet=True)
        manifest = result.manifest
        row["compress"] = f"{manifest.precision} ({time.perf_counter() - t0:.0f} s)"
        row["outputs"] = ", ".join(manifest.output.names())
        stage = "reference"
        want = reference(cfg, manifest)
        for backend in ("openvino", "torch"):
            stage = f"infer ({backend})"
            icfg, seconds = run_infer(result.output, image, work / f"pred_{backend}", backend, threads)
            row[f"s {backend}"] = seconds
            row[f"r {backend}"] = pearsons(read_outputs(icfg, image, manifest), want)
        row["speed-up"] = f"{row['s torch'] / row['s openvino']:.2f}x"
        row["s openvino"] = f"{row['s openvino']:.2f}"
        row["s torch"] = f"{row['s torch']:.2f}"
    except EfficientBioAIError as exc:
        row["note"] = message(exc) if stage == "compress" else f"{stage}: {message(exc)}"
    except Exception as exc:  # not a refusal the package explains: a bug, with its traceback kept
        row["note"] = f"{stage}: {message(exc)} (unexpected, traceback below)"
        bugs.append(f"[{label}, {stage}]\n{traceback.format_exc()}")
    return row


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared",
        type=Path,
        default=DEFAULT_SHARED,
        help="bioimage.io package folder (default: ../shared/models/unet2d_nuclei_broad from the repo root)",
    )
    parser.add_argument("--threads", type=int, default=2, help="engine threads (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="smaller images (2D 512x512, 3D 64x128x128, fewer calib images)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (artifacts, outputs)"
    )
    args = parser.parse_args()

    quiet_libraries()
    import torch

    torch.set_num_threads(args.threads)
    cpu_name, _ = cpu.read_cpuinfo()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("openvino", "nncf", "torch", "monai"))
    cap = f"; ISA capped: {cpu.describe_cap()}" if cpu.isa_cap() else ""
    print(f"CPU: {cpu_name}; flags: {cpu.flags_line(cpu.cpu_flags())}{cap}")
    print(f"versions: {versions}; python {platform.python_version()}; threads: {args.threads}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="models_cpu-"))
    rows, bugs = [], []
    engine = {"threads": args.threads, "latency_repeats": 2}
    try:
        images = make_images(work, args.quick)
        whole2 = images["whole2d"]

        # 1. the real bioimage.io model
        shared = args.shared.resolve()
        label = f"bioimage.io {shared.name}"
        if not (shared / "bioimageio.yaml").is_file() and not (shared / "rdf.yaml").is_file():
            rows.append({"model": label, "compress": "-", "note": f"not present ({shared})"})
        else:
            print(f"\n[{label}] ...", flush=True)
            raw = package_test_input(shared)
            tif = write_tif(work / "bioimageio_test_input.tif", raw.reshape(raw.shape[-2:]))
            cfg = {
                "model": {"kind": "bioimageio", "path": str(shared)},
                "calibration": {"num_tiles": 16, "tile_shape": [256, 256]},
                "engine": engine,
                "output": str(work / "art_bioimageio"),
            }

            def ref_bioimageio(c, m, raw=raw):
                return bioimageio_reference(c, m, raw)

            rows.append(run_row(label, cfg, tif, ref_bioimageio, work / "bioimageio", args.threads, bugs))

        # 2. the networks of tests/test_model_outputs.py
        import tifffile

        import tests.test_model_outputs as nets

        image2 = tifffile.imread(whole2)
        for label, factory, extra, expected in TEST_NETWORKS:
            print(f"[{label}] ...", flush=True)
            cfg = {
                "model": {
                    "kind": "torch",
                    "factory": f"tests.test_model_outputs:{factory}",
                    "axes": "bcyx",
                    **extra,
                },
                "calibration": {"images": str(images["calib2d"] / "*.tif"), "tile_shape": [64, 64]},
                "engine": engine,
                "output": str(work / f"art_{factory}"),
            }

            def ref(c, m, factory=factory, extra=extra):
                return torch_outputs(getattr(nets, factory)(), image2, extra.get("outputs"))

            row = run_row(label, cfg, whole2, ref, work / factory, args.threads, bugs)
            if expected and row["compress"] == "failed":
                row["compress"] = "refused (expected)"
            rows.append(row)

        # 3. a 5-level 3D MONAI UNet, random weights
        label = "MONAI UNet 3D, 5 levels"
        print(f"[{label}] ...", flush=True)
        torch.manual_seed(0)
        import monai.networks.nets as monai_nets

        unet = monai_nets.UNet(**UNET3D).eval()
        checkpoint = work / "unet3d.pt"
        torch.save(unet.state_dict(), checkpoint)
        cfg = {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": UNET3D,
                "checkpoint": str(checkpoint),
                "axes": "bczyx",
            },
            "calibration": {"images": str(images["calib3d"] / "*.tif"), "tile_shape": [32, 64, 64]},
            "engine": engine,
            "output": str(work / "art_unet3d"),
        }
        volume = tifffile.imread(images["whole3d"])

        def ref3d(c, m):
            return torch_outputs(unet, volume, None)

        rows.append(run_row(label, cfg, images["whole3d"], ref3d, work / "unet3d", args.threads, bugs))

        header = ["model", "compress", "outputs", "r openvino", "r torch", "s openvino", "s torch"]
        header += ["speed-up", "note"]
        shapes = f"2D {image2.shape[0]}x{image2.shape[1]}, 3D {'x'.join(map(str, volume.shape))}"
        title = (
            f"compress with defaults -> infer a whole image ({shapes}; bioimage.io: its 512x512 test input); "
            f"r = Pearson of each output file vs the original on the whole image; s = whole-image seconds "
            f"(one run after warm-up), {args.threads} threads"
        )
        print()
        print(table(header, [[r.get(h, "-") for h in header] for r in rows], title=title))
        print("r torch: the original PyTorch model through the same tiling (what tiling alone changes)")
        print("timings are indicative only: other work may share this machine")
        if bugs:
            print("\nunexpected errors (not refusals the package explains):")
            print("\n".join(bugs))
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
