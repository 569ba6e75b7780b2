"""CPU benchmark: PyTorch fp32 eager vs OpenVINO fp32 / bf16 / int8 (NNCF) on two segmentation networks.

Models:
  1. a 3D MONAI UNet (channels 16..256, 2 residual units, random weights seeded with torch.manual_seed(0)),
     one tile of 1x1x32x128x128; calibrated on synthetic blob ("nuclei") volumes generated with a
     different seed than the evaluation tile;
  2. the bioimage.io model ../shared/models/unet2d_nuclei_broad (TorchScript weights as the PyTorch
     baseline) on its normalised test input (1x1x512x512); calibrated on 256x256 crops of that input
     (the package carries no other data). Skipped with a note when the folder is absent.

For every engine: median latency of one tile (after warm-up; the engines are timed in interleaved rounds,
in rotating order, so that machine drift favours none), speed-up vs PyTorch fp32 eager and vs OpenVINO
fp32, Pearson r of the output vs the PyTorch output on the same tile (after the package's sigmoid for the
bioimage.io model), and the precision OpenVINO reports for the float parts (for int8 engines also the
number of convolutions that run in int8). All engines use the same number of threads. The ONNX graph
gets the same exact rewrites as in `efficientbioai compress` (a 1×1 convolution after an upsampling runs
before it; a narrow transposed convolution becomes a convolution + pixel shuffle); when they change the
graph, "OpenVINO int8, not rewritten" shows int8 without them.

Run:  python benchmarks/compress_cpu.py [--threads N] [--repeats 20] [--calib-tiles 32] [--quick] [--profile]

--profile adds OpenVINO's per-layer timings by layer type and the multiply-accumulate rate of the
convolutions for each precision: on a CPU whose int8 convolutions already run at its int8/fp32 throughput
ratio (4× with AVX512-VNNI and no AMX), no software change makes int8 much faster.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from efficientbioai import metrics
from efficientbioai.compress.calibration import postprocess, preprocess
from efficientbioai.compress.export import export_onnx, rewrite_onnx, slim_onnx, to_openvino
from efficientbioai.compress.quantize import quantize_int8
from efficientbioai.compress.rewrite import rewrite_summary
from efficientbioai.config import ModelConfig, QuantizeConfig
from efficientbioai.engines import OpenVINOEngine, TorchEngine, default_threads, median_latency_ms
from efficientbioai.models import load_model
from efficientbioai.tables import table

BIOIMAGEIO = Path(__file__).resolve().parents[2] / "shared" / "models" / "unet2d_nuclei_broad"
ROWS = ("PyTorch fp32 eager", "OpenVINO fp32", "OpenVINO bf16", "OpenVINO int8")
NOT_REWRITTEN = "OpenVINO int8, not rewritten"
MIN_PEARSON = 0.99


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blobs(shape: tuple[int, ...], rng: np.random.Generator, n: int = 40) -> np.ndarray:
    """A (1, *shape) float32 image of gaussian blobs ("nuclei") plus noise, zero mean, unit variance."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    img = np.zeros(shape, np.float32)
    for _ in range(n):
        centre = [rng.uniform(0, s) for s in shape]
        sigma = rng.uniform(2, 6) * np.array(
            [0.4 if len(shape) == 3 and i == 0 else 1.0 for i in range(len(shape))]
        )
        r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, sigma, strict=True))
        img += rng.uniform(0.5, 1.5) * np.exp(-0.5 * r2).astype(np.float32)
    img += rng.normal(0, 0.1, shape).astype(np.float32)
    return ((img - img.mean()) / (img.std() + 1e-6))[np.newaxis].astype(np.float32)


def int8_convolutions(engine: OpenVINOEngine) -> str:
    """How many (de)convolutions of the compiled graph run in int8, read from OpenVINO's runtime model."""
    precisions = [
        info["runtimePrecision"].astype(str)
        for info in (op.get_rt_info() for op in engine.compiled.get_runtime_model().get_ordered_ops())
        if info["layerType"].astype(str) in ("Convolution", "Deconvolution")
    ]
    return f"{sum(p in ('u8', 'i8') for p in precisions)}/{len(precisions)} conv int8"


def build_engines(module, x: np.ndarray, axes: str, calib: list[np.ndarray], threads: int):
    """PyTorch eager plus OpenVINO fp32 / bf16 / int8 engines from one ONNX export of ``module``.

    The ONNX graph goes through the same slimming and exact rewrites as in ``efficientbioai compress``.
    When a rewrite changed the graph, an int8 engine built without it is added for comparison.
    Returns the engines and the ``openvino.Model`` behind each OpenVINO engine (for ``--profile``).
    """
    engines = {ROWS[0]: TorchEngine(module, threads)}
    models = {}
    cfg = QuantizeConfig(precision="int8", preset="performance", per_channel=True)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(module, x, Path(tmp) / "model.onnx", axes)
        slim_onnx(onnx_path)
        plain = to_openvino(onnx_path)
        rewritten = rewrite_onnx(onnx_path)
        models[ROWS[1]] = to_openvino(onnx_path)
        models[ROWS[2]] = to_openvino(onnx_path)
        models[ROWS[3]] = quantize_int8(to_openvino(onnx_path), calib, cfg)
        if rewritten:
            print(f"  exact rewrite: {rewrite_summary(rewritten)}", flush=True)
            models[NOT_REWRITTEN] = quantize_int8(plain, calib, cfg)
    for name, model in models.items():
        precision = "bf16" if name == ROWS[2] else "int8" if "int8" in name else "fp32"
        engines[name] = OpenVINOEngine(model, precision, threads)
    return engines, models


def convolution_macs(model, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of all (transposed, grouped) convolutions of ``model`` at input ``shape``."""
    m = model.clone()
    m.reshape(list(shape))
    total = 0
    for op in m.get_ordered_ops():
        kind = op.get_type_name()
        if "Convolution" not in kind:
            continue
        w = list(op.input(1).get_shape())
        if kind.startswith("Group"):
            w = w[1:]  # [G, a, b, *k] → per group [a, b, *k]
        k = int(np.prod(w[2:]))
        if kind.endswith("BackpropData"):  # weight [Cin, Cout, *k]: every input value feeds Cout × k outputs
            total += int(np.prod(list(op.input(0).get_shape()))) * w[1] * k
        else:  # weight [Cout, Cin, *k]: every output value sums Cin × k products
            total += int(np.prod(list(op.output(0).get_shape()))) * w[1] * k
    return total


def profile(models: dict, x: np.ndarray, threads: int, rounds: int = 10) -> None:
    """OpenVINO's per-layer timings, by layer type, and the convolutions' multiply-accumulate rate.

    Shows how close each precision gets to the CPU's peak: if int8 convolutions already run at about the
    ratio of int8 to fp32 throughput of the hardware, only other hardware (AMX) makes int8 much faster.
    """
    import openvino as ov

    macs = convolution_macs(models[ROWS[1]], x.shape)
    core = ov.Core()
    rows, rate = [], {}
    for name, model in models.items():
        hint = {ROWS[2]: "bf16"}.get(name, "f32")
        compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": threads,
                "PERF_COUNT": True,
            },
        )
        request = compiled.create_infer_request()
        for _ in range(3):
            request.infer({0: x})
        by_type: dict[str, float] = {}
        for _ in range(rounds):
            request.infer({0: x})
            for info in request.profiling_info:
                ms = info.real_time.total_seconds() * 1e3 / rounds
                by_type[info.node_type] = by_type.get(info.node_type, 0.0) + ms
        is_conv = {k: "onvolution" in k for k in by_type}  # (Group)Convolution, Deconvolution, …BackpropData
        conv = sum(v for k, v in by_type.items() if is_conv[k])
        rest = sorted(((v, k) for k, v in by_type.items() if not is_conv[k]), reverse=True)
        rate[name] = macs / (conv * 1e-3) / 1e12
        rows.append(
            [
                name,
                f"{sum(by_type.values()):.1f}",
                f"{conv:.1f}",
                f"{rate[name]:.3f}",
                ", ".join(f"{k} {v:.1f}" for v, k in rest[:3] if v >= 0.05),
            ]
        )
    header = ["engine", "layers ms", "conv ms", "conv TMAC/s", "largest other layers (ms)"]
    print(table(header, rows, title=f"OpenVINO per-layer profile ({macs / 1e9:.2f} GMAC of convolutions)"))
    print(
        f"int8 / fp32 convolution throughput: {rate[ROWS[3]] / rate[ROWS[1]]:.2f}x; "
        f"bf16 / fp32: {rate[ROWS[2]] / rate[ROWS[1]]:.2f}x"
    )


def interleaved_latency(engines: dict, x: np.ndarray, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per engine; each round times every engine once, in an order that rotates every round."""
    names = list(engines)
    for name in names:
        for _ in range(warmup):
            engines[name](x)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(median_latency_ms(engines[name], x, warmup=0, repeats=1)["median_ms"])
    return {n: float(np.median(t)) for n, t in times.items()}


def benchmark(
    title: str, module, x: np.ndarray, axes: str, calib: list[np.ndarray], post, min_speedup: float, args
) -> None:
    print(
        f"\n[{title}] exporting, converting and quantizing on {len(calib)} calibration tiles ...", flush=True
    )
    engines, models = build_engines(module, x, axes, calib, args.threads)
    outputs = {name: post(eng(x)) for name, eng in engines.items()}
    lat = interleaved_latency(engines, x, args.repeats)
    ref_ms, ov_ms, ref_out = lat[ROWS[0]], lat[ROWS[1]], outputs[ROWS[0]]
    pearson = {name: metrics.pearson(out, ref_out) for name, out in outputs.items()}
    rows = []
    for name, eng in engines.items():
        precision = eng.precision if isinstance(eng, OpenVINOEngine) else "(torch fp32)"
        if name in (ROWS[3], NOT_REWRITTEN):
            precision += f" + {int8_convolutions(eng)}"
        rows.append(
            [
                name,
                f"{lat[name]:.1f}",
                f"{ref_ms / lat[name]:.2f}x",
                f"{ov_ms / lat[name]:.2f}x",
                f"{pearson[name]:.5f}",
                precision,
            ]
        )
    header = ["engine", "median ms", "vs PyTorch", "vs OV fp32", "Pearson r", "OV precision"]
    print(
        table(
            header,
            rows,
            title=f"{title}: tile {tuple(x.shape)}, {args.threads} threads, "
            f"{args.repeats} interleaved rounds",
        )
    )
    speedup, r = ref_ms / lat[ROWS[3]], pearson[ROWS[3]]
    ok = speedup >= min_speedup and r >= MIN_PEARSON
    print(
        f"targets: int8 >= {min_speedup:g}x faster than PyTorch fp32 eager: {'met' if speedup >= min_speedup else 'NOT met'} "
        f"({speedup:.2f}x); int8 Pearson r >= {MIN_PEARSON}: {'met' if r >= MIN_PEARSON else 'NOT met'} ({r:.5f})"
        f" -> {'all targets met' if ok else 'targets NOT met'}"
    )
    for eng in engines.values():
        eng.close()
    if args.profile:
        profile(models, x, args.threads)


def unet3d(args) -> None:
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    ).eval()
    shape = (32, 128, 128)
    x = blobs(shape, np.random.default_rng(12345))[np.newaxis]
    calib_rng = np.random.default_rng(0)
    calib = [blobs(shape, calib_rng) for _ in range(args.calib_tiles)]
    benchmark("3D MONAI UNet (random init, seed 0)", net, x, "bczyx", calib, lambda y: y, 6.0, args)


def bioimageio(args) -> None:
    if not BIOIMAGEIO.is_dir():
        print(f"\n[bioimage.io] skipped: {BIOIMAGEIO} is absent")
        return
    _, loaded = load_model(ModelConfig(kind="bioimageio", path=BIOIMAGEIO))
    image = preprocess(
        np.asarray(loaded.sample_inputs[0], np.float32)[0], loaded
    )  # (C, Y, X), zero mean unit var
    x = image[np.newaxis]
    rng = np.random.default_rng(0)
    size = 256
    calib = []
    for _ in range(args.calib_tiles):
        y0, x0 = (int(rng.integers(0, s - size + 1)) for s in image.shape[1:])
        calib.append(np.ascontiguousarray(image[:, y0 : y0 + size, x0 : x0 + size]))
    benchmark(
        f"bioimage.io {loaded.name} ({loaded.source['weights']})",
        loaded.module,
        x,
        loaded.axes,
        calib,
        lambda y: postprocess(y, loaded),
        8.0,
        args,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="CPU threads (default: all cores)"
    )
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds (default 20)")
    parser.add_argument("--calib-tiles", type=int, default=32, help="int8 calibration tiles (default 32)")
    parser.add_argument("--quick", action="store_true", help="smaller run: 5 rounds, 8 calibration tiles")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print OpenVINO's per-layer time by layer type and the convolutions' MAC rate per precision",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.calib_tiles = min(args.repeats, 5), min(args.calib_tiles, 8)

    import nncf

    nncf.set_log_level(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="nncf")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "openvino", "nncf", "numpy"))
    print(f"CPU: {cpu_model()} ({default_threads()} cores available); threads: {args.threads}")
    print(f"versions: {versions}; python {platform.python_version()}")
    unet3d(args)
    bioimageio(args)


if __name__ == "__main__":
    main()
