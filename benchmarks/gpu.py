"""GPU benchmark: the original PyTorch model vs TensorRT fp16 / int8 / fp8 and torch fp16 on whole images.

Needs an NVIDIA GPU (it exits with a message without one); TensorRT rows need the ``tensorrt`` package
(``pip install 'efficientbioai[gpu]'``) and are reported as skipped without it. Nothing is downloaded.

Models (``--models``):

* ``unet3d``: the 3D MONAI UNet of benchmarks/infer_cpu.py (channels 16..256, 2 residual units), trained
  here for ``--train-steps`` steps (on the GPU, a few seconds) to denoise generated nuclei volumes, so that
  quantization is judged on a network that computes something; whole volume ``--shape`` (default
  64 × 512 × 512), tile 32 × 128 × 128;
* ``unet2d``: the bioimage.io "UNet 2D Nuclei Broad" package in ../shared/models (skipped when absent),
  whole 2048 × 2048 generated image, tile 256 × 256;
* ``cellpose``: a Cellpose 3 CPnet (random weights; needs the cellpose extra, skipped without it), network
  outputs (flows + cell probability) over a whole 2048 × 2048 two-channel image, tile 224 × 224.

Every model goes through ``efficientbioai.compress`` (export.targets [onnx, tensorrt]); the int8 / fp8
graphs are calibrated on tiles of separate generated images. Every row runs the same sliding-window
``Predictor`` as ``efficientbioai infer`` (overlap 0.25, gaussian blending, ``--batch`` tiles per call,
pipelined host ↔ GPU copies), on one image held in memory:

* PyTorch fp32 eager (original): the module on the GPU, no autocast, default memory format;
* torch fp16: autocast + channels-last (``backend: torch-cuda``);
* TensorRT fp16 / int8 / fp8 (fp8 only on compute capability ≥ 8.9).

Each row: one untimed warm-up run, then ``--repeats`` timed whole-image runs (median; the GPU is
synchronised before the clock stops), GPU energy from NVML's counter (measured) per run, Pearson r of the
stitched output vs the original row's. TensorRT build times are printed apart.

Target (3D UNet, whole volume): TensorRT int8 or fp8 ≥ 5× faster than PyTorch fp32 eager with a Pearson
drop ≤ 0.005.

Run:  python benchmarks/gpu.py [--models unet3d unet2d cellpose] [--precisions fp16 int8 fp8]
      [--repeats 3] [--batch 4] [--shape 64 512 512] [--opt-level 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from infer_cpu import KWARGS  # sibling benchmark script (its folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SHARED_UNET2D = REPO.parent / "shared" / "models" / "unet2d_nuclei_broad"
UNET3D = KWARGS  # benchmarks/infer_cpu.py's network
TARGET_SPEEDUP, TARGET_DROP = 5.0, 0.005
NO_GPU = (
    "benchmarks/gpu.py needs an NVIDIA GPU with CUDA and PyTorch's CUDA build: torch.cuda.is_available() is "
    "False on this machine ({why}). Run it on a GPU machine (benchmarks/gpu_check.sh prepares one)."
)


def _noisy(image: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (image + 0.15 * rng.standard_normal(image.shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------ models


def train_unet3d(steps: int, work: Path) -> Path:
    """The benchmark 3D UNet trained to denoise generated nuclei (GPU, fp32); returns its state dict file."""
    import torch
    from monai.networks.nets import UNet

    from efficientbioai.synthetic import nuclei

    torch.manual_seed(0)
    net = UNet(**UNET3D).cuda()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    clean = [nuclei((32, 128, 128), seed=100 + s)[0] for s in range(8)]
    t0 = time.perf_counter()
    for step in range(steps):
        idx = np.random.default_rng(step).integers(0, len(clean), 4)
        y = torch.from_numpy(np.stack([clean[i] for i in idx])[:, None]).cuda()
        x = y + 0.15 * torch.randn_like(y)
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    print(f"unet3d: trained {steps} steps in {time.perf_counter() - t0:.1f} s (loss {loss.item():.4f})")
    path = work / "unet3d.pt"
    torch.save(net.cpu().state_dict(), path)
    return path


def model_specs(args, work: Path) -> list[dict]:
    """(name, model config, whole image (C, *spatial), calibration images, tile) per requested model."""
    import tifffile

    from efficientbioai.synthetic import nuclei

    specs = []
    if "unet3d" in args.models:
        ckpt = train_unet3d(args.train_steps, work)
        calib = work / "calib3d"
        calib.mkdir(exist_ok=True)
        for s in range(2):
            tifffile.imwrite(calib / f"v{s}.tif", _noisy(nuclei((64, 256, 256), seed=10 + s)[0], s))
        specs.append(
            {
                "name": "3D MONAI UNet",
                "model": {
                    "kind": "monai",
                    "name": "UNet",
                    "kwargs": UNET3D,
                    "checkpoint": str(ckpt),
                    "axes": "bczyx",
                },
                "calibration": str(calib),
                "tile": [32, 128, 128],
                "image": _noisy(nuclei(tuple(args.shape), seed=1)[0], 99)[np.newaxis],
                "is_3d": True,
            }
        )
    if "unet2d" in args.models:
        if not (SHARED_UNET2D / "bioimageio.yaml").is_file():
            print(f"unet2d: skipped ({SHARED_UNET2D} is not present)")
        else:
            calib = work / "calib2d"
            calib.mkdir(exist_ok=True)
            for s in range(2):
                tifffile.imwrite(calib / f"c{s}.tif", nuclei((512, 512), seed=20 + s)[0])
            specs.append(
                {
                    "name": "bioimage.io UNet 2D Nuclei Broad",
                    "model": {"kind": "bioimageio", "path": str(SHARED_UNET2D)},
                    "calibration": str(calib),
                    "tile": [256, 256],
                    "image": nuclei((2048, 2048), seed=2048)[0][np.newaxis],
                }
            )
    if "cellpose" in args.models:
        try:
            import cellpose  # noqa: F401
        except ImportError:
            print(
                "cellpose: skipped (the cellpose extra is not installed: pip install 'efficientbioai[cellpose]')"
            )
        else:
            specs.append(cellpose_spec(work))
    return specs


def cellpose_spec(work: Path) -> dict:
    """A Cellpose 3 CPnet at its real width (random weights) as a kind torch model with two channels."""
    import tifffile
    import torch

    from efficientbioai.synthetic import nuclei

    factory = work / "cellpose_factory.py"
    factory.write_text(
        "from cellpose.resnet_torch import CPnet\n"
        "from efficientbioai.cellpose.network import CellposeFlows\n\n"
        "def make():\n"
        "    return CellposeFlows(CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=False, max_pool=True, "
        "diam_mean=30.0))\n"
    )
    sys.path.insert(0, str(work))
    import cellpose_factory

    torch.manual_seed(0)
    ckpt = work / "cpnet.pt"
    torch.save(cellpose_factory.make().state_dict(), ckpt)
    calib = work / "calib_cp"
    calib.mkdir(exist_ok=True)
    for s in range(2):
        im = nuclei((512, 512), seed=30 + s)[0]
        tifffile.imwrite(calib / f"c{s}.tif", np.stack([im, 0.5 * im]))
    im = nuclei((2048, 2048), seed=2049)[0]
    return {
        "name": "Cellpose 3 CPnet (network)",
        "model": {
            "kind": "torch",
            "factory": "cellpose_factory:make",
            "checkpoint": str(ckpt),
            "axes": "bcyx",
        },
        "calibration": str(calib),
        "calibration_axes": "cyx",
        "tile": [224, 224],
        "image": np.stack([im, 0.5 * im]),
    }


# ------------------------------------------------------------------------------------------- rows


def compress_spec(spec: dict, work: Path, tensorrt_precision: str) -> Path:
    from efficientbioai.compress import compress
    from efficientbioai.config import validate_config

    out = work / f"{spec['name'].split()[0].lower()}_{len(spec['tile'])}d"
    cfg = validate_config(
        {
            "model": spec["model"],
            "calibration": {
                "images": spec["calibration"],
                "num_tiles": 32,
                "tile_shape": spec["tile"],
                **({"axes": spec["calibration_axes"]} if "calibration_axes" in spec else {}),
            },
            "quantize": {"precision": "fp32"},
            "export": {"targets": ["onnx", "tensorrt"], "tensorrt": {"precision": tensorrt_precision}},
            "fidelity": {"num_tiles": 4},
            "engine": {"latency_repeats": 2},
            "output": str(out),
            "overwrite": True,
        }
    )
    t0 = time.perf_counter()
    compress(cfg, quiet=True)
    print(f"{spec['name']}: compressed in {time.perf_counter() - t0:.0f} s")
    return out


def calibration_tiles(spec: dict, manifest, n: int = 32) -> list[np.ndarray]:
    """Preprocessed tiles of the calibration images (random positions, seeded)."""
    from efficientbioai.io import expand_paths, read_image, to_model_layout
    from efficientbioai.processing import apply_steps

    axes = manifest.input.axes
    rng = np.random.default_rng(0)
    images = [
        apply_steps(
            to_model_layout(read_image(f), spec.get("calibration_axes"), axes, str(f))[np.newaxis],
            manifest.input.preprocessing,
            axes,
        )[0]
        for f in expand_paths(spec["calibration"], "calibration")
    ]
    tiles = []
    for k in range(n):
        im = images[k % len(images)]
        start = [int(rng.integers(0, s - t + 1)) for s, t in zip(im.shape[1:], spec["tile"], strict=True)]
        sl = tuple(slice(a, a + t) for a, t in zip(start, spec["tile"], strict=True))
        tiles.append(np.ascontiguousarray(im[(slice(None), *sl)], np.float32))
    return tiles


def time_engine(engine, manifest, artifact: Path, image, args, meter) -> dict:
    from efficientbioai.config import TilingConfig
    from efficientbioai.infer import Predictor

    tiling = TilingConfig(tile_shape=list(engine_tile(manifest)), batch_size=args.batch)
    predictor = Predictor.from_artifact(manifest, engine, tiling)
    predictor.warm_up(image.shape[0])
    out = predictor(image).output  # untimed: allocator, cuDNN / TensorRT tactics
    seconds, joules = [], []
    for _ in range(args.repeats):
        with meter.measure(engine.synchronize) as m:
            t0 = time.perf_counter()
            out = predictor(image).output
            engine.synchronize()
            seconds.append(time.perf_counter() - t0)
        gj = (m.reading.details or {}).get("gpu_joules") if m.reading else None
        if gj is not None:
            joules.append(gj)
    return {
        "seconds": statistics.median(seconds),
        "gpu_joules": statistics.median(joules) if joules else None,
        "output": out,
    }


def engine_tile(manifest) -> tuple[int, ...]:
    return tuple(manifest.calibration.tile_shape)


def run_model(spec: dict, args, work: Path, meter, trt_ok: bool, trt_why: str) -> list[dict]:
    import torch

    from efficientbioai import metrics
    from efficientbioai.artifact import Artifact
    from efficientbioai.compress.tensorrt import profile_shapes
    from efficientbioai.compress.trt_graph import prepare_onnx
    from efficientbioai.engines.cuda import TorchCudaEngine, gpu_description
    from efficientbioai.engines.tensorrt import FP8_MIN_CAPABILITY, TensorRTEngine, build_plan

    artifact = compress_spec(spec, work, "int8" if "int8" in args.precisions else "fp16")
    art = Artifact(artifact)
    manifest = art.manifest
    image = spec["image"]
    rows: list[dict] = []

    def add(label: str, engine) -> None:
        with engine:
            r = time_engine(engine, manifest, artifact, image, args, meter)
        rows.append({"model": spec["name"], "engine": label, **r})
        print(f"  {label:<32} {r['seconds']:.3f} s")
        torch.cuda.empty_cache()

    original = art.open_original(1).module
    add("PyTorch fp32 eager (original)", TorchCudaEngine(original, "fp32", channels_last=False))
    add("torch fp16 autocast, channels-last", TorchCudaEngine(art.open_original(1).module, "fp16"))
    if not trt_ok:
        print(f"  TensorRT rows skipped: {trt_why}")
    else:
        cc = tuple(int(v) for v in gpu_description()["compute_capability"].split("."))
        tiles = calibration_tiles(spec, manifest)
        profile = profile_shapes(
            engine_tile(manifest),
            manifest.input.channels,
            manifest.input.tile_min,
            manifest.input.tile_step,
            args.batch,
            args.batch,
        )
        for precision in args.precisions:
            if precision == "fp8" and cc < FP8_MIN_CAPABILITY:
                print(f"  TensorRT fp8 skipped: compute capability {cc} < 8.9")
                continue
            onnx_path, _ = prepare_onnx(
                artifact / "model.onnx", precision, work / "trt" / artifact.name, tiles
            )
            t0 = time.perf_counter()
            plan = build_plan(onnx_path, profile, opt_level=args.opt_level)
            print(f"  TensorRT {precision}: engine built in {time.perf_counter() - t0:.1f} s")
            add(f"TensorRT {precision}", TensorRTEngine(plan, precision))
    ref = rows[0]["output"]
    for r in rows:
        r["pearson"] = metrics.pearson(r.pop("output"), ref)
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    return rows


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["unet3d", "unet2d", "cellpose"])
    p.add_argument(
        "--precisions", nargs="+", default=["fp16", "int8", "fp8"], choices=["fp16", "bf16", "int8", "fp8"]
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512])
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        why = "CPU-only PyTorch build" if torch.version.cuda is None else "no NVIDIA GPU or driver found"
        print(NO_GPU.format(why=why), file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    from efficientbioai.compress.tensorrt import gpu_status
    from efficientbioai.energy import EnergyMeter
    from efficientbioai.engines.cuda import gpu_description
    from efficientbioai.engines.tensorrt import tensorrt_version
    from efficientbioai.infer.gpu import nvml_index
    from efficientbioai.tables import table

    gpu = gpu_description()
    trt_ok, trt_why = gpu_status()
    print(
        f"GPU: {gpu['name']} (compute capability {gpu['compute_capability']}), torch {torch.__version__}, "
        f"TensorRT {tensorrt_version() or 'not installed'}; batch {args.batch}, {args.repeats} timed runs each"
    )
    rows: list[dict] = []
    with (
        tempfile.TemporaryDirectory(prefix="ebai-gpu-") as tmp,
        EnergyMeter(gpu_index=nvml_index(0)) as meter,
    ):
        work = Path(tmp)
        for spec in model_specs(args, work):
            print(f"{spec['name']}: whole image {tuple(spec['image'].shape)}")
            rows += run_model(spec, args, work, meter, trt_ok, trt_why)
    header = ["model", "engine", "whole image", "speed-up", "GPU energy (NVML)", "Pearson r vs original"]
    body = [
        [
            r["model"],
            r["engine"],
            f"{r['seconds']:.3f} s",
            f"{r['speedup']:.2f}x",
            f"{r['gpu_joules']:.1f} J" if r["gpu_joules"] is not None else "-",
            f"{r['pearson']:.5f}",
        ]
        for r in rows
    ]
    print()
    print(table(header, body, title=f"{gpu['name']}: whole images, medians of {args.repeats} runs"))
    target = [
        r for r in rows if r["model"] == "3D MONAI UNet" and r["engine"] in ("TensorRT int8", "TensorRT fp8")
    ]
    if target:
        best = max(target, key=lambda r: r["speedup"] if 1 - r["pearson"] <= TARGET_DROP else 0)
        met = best["speedup"] >= TARGET_SPEEDUP and 1 - best["pearson"] <= TARGET_DROP
        print(
            f"target (3D UNet: TensorRT int8/fp8 ≥ {TARGET_SPEEDUP:g}x PyTorch fp32 eager, Pearson drop ≤ "
            f"{TARGET_DROP}): {'met' if met else 'NOT met'} — {best['engine']} {best['speedup']:.2f}x, "
            f"drop {1 - best['pearson']:.4f}"
        )
    elif "unet3d" in args.models:
        print("target (3D UNet, TensorRT int8/fp8): not measured — " + (trt_why or "no int8/fp8 row"))
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
