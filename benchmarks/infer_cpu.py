"""Whole-volume CPU benchmark: MONAI ``sliding_window_inference`` in PyTorch fp32 (what users run today)
against efficientbioai's int8 OpenVINO pipeline, same tile, overlap and gaussian blending.

Model: the 3D MONAI UNet of benchmarks/compress_cpu.py (channels 16..256, 2 residual units; random
weights seeded with torch.manual_seed(0): fine for timing, not for judging accuracy), compressed to int8
with ``efficientbioai.compress`` calibrated on a generated nuclei volume. Volume: a generated
64×512×512 nuclei volume (``efficientbioai.synthetic.nuclei``, another seed). Tile 32×128×128, overlap
0.25 → 75 tiles for both.

Rows (each run ``--repeats`` times after one untimed warm-up; median; all with the same threads):
  - PyTorch fp32 eager + MONAI sliding_window_inference (mode gaussian, sw_batch_size 1);
  - our pipeline with the OpenVINO fp32 engine (the same engine in fp32);
  - our pipeline with the int8 engine, OpenVINO hint LATENCY and THROUGHPUT;
  - the raw int8 engine: the same 75 tiles, pre-extracted in memory, through the same AsyncInferQueue
    with no reading or blending — the pipeline's efficiency is raw time / end-to-end time.
Peak memory is the highest RSS (sampled every 5 ms) above the RSS before the run. Energy: CodeCarbon's
offline tracker, with its method.

Run:  python benchmarks/infer_cpu.py [--threads N] [--repeats 3] [--shape 64 512 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

SPEED_TARGET, EFFICIENCY_TARGET = 8.0, 0.85
TILE, OVERLAP = (32, 128, 128), 0.25
KWARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
}


class PeakRSS:
    """Highest resident memory above the starting point while the block runs (sampled)."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra = self.peak - self.base


def measure(fn, repeats: int, meter):
    """(median seconds, last output, peak extra RSS bytes, median energy reading) after one warm-up."""
    fn()
    times, joules, peaks, reading, out = [], [], [], None, None
    for _ in range(repeats):
        with PeakRSS() as mem, meter.measure() as m:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        peaks.append(mem.extra)
        reading = m.reading
        if reading.joules is not None:
            joules.append(reading.joules)
    energy = (statistics.median(joules), reading.method) if joules else (None, "unavailable")
    return statistics.median(times), out, max(peaks), energy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 512, 512])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import tifffile
    import torch
    from compress_cpu import cpu_model  # noqa: I001 - sibling script
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from efficientbioai import metrics
    from efficientbioai.compress import compress
    from efficientbioai.config import CompressConfig, validate_config
    from efficientbioai.energy import EnergyMeter
    from efficientbioai.engines import OpenVINOEngine, default_threads
    from efficientbioai.infer.pipeline import open_engine
    from efficientbioai.infer.predict import Predictor
    from efficientbioai.manifest import read_manifest
    from efficientbioai.report import human_bytes, table
    from efficientbioai.synthetic import nuclei

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="efficientbioai-infer-bench-"))
    torch.manual_seed(0)
    net = UNet(**KWARGS).eval()
    torch.save(net.state_dict(), tmp / "unet3d.pt")
    calib, _ = nuclei((64, 256, 256), seed=1)
    tifffile.imwrite(tmp / "calib.tif", calib)
    print(f"compressing the 3D UNet to int8 in {tmp} …", flush=True)
    cfg = validate_config(
        {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": KWARGS,
                "checkpoint": str(tmp / "unet3d.pt"),
                "axes": "bczyx",
            },
            "calibration": {"images": str(tmp / "calib.tif"), "num_tiles": 32, "tile_shape": list(TILE)},
            "fidelity": {"num_tiles": 4},
            "engine": {"threads": threads, "latency_repeats": 3},
            "output": str(tmp / "unet3d_int8"),
        },
        CompressConfig,
    )
    compress(cfg, quiet=True)
    artifact = tmp / "unet3d_int8"
    manifest = read_manifest(artifact)
    volume, _ = nuclei(tuple(args.shape), seed=2)
    image = volume[np.newaxis]  # (C, Z, Y, X)
    meter = EnergyMeter()

    def predictor(engine) -> Predictor:
        inp = manifest["input"]
        return Predictor(
            engine=engine,
            axes=inp["axes"],
            out_channels=1,
            tile_shape=TILE,
            tile_min=inp["tile_min"],
            tile_step=inp["tile_step"],
            overlap=OVERLAP,
            blend="gaussian",
        )

    rows: dict[str, dict] = {}

    print("PyTorch fp32 eager + MONAI sliding_window_inference …", flush=True)
    x = torch.from_numpy(image[np.newaxis])

    def monai_run():
        with torch.inference_mode():
            return sliding_window_inference(
                x, roi_size=TILE, sw_batch_size=1, predictor=net, overlap=OVERLAP, mode="gaussian"
            )[0].numpy()

    sec, ref, peak, energy = measure(monai_run, args.repeats, meter)
    rows["PyTorch fp32 + MONAI sliding window"] = dict(sec=sec, out=ref, peak=peak, energy=energy)

    engines = {
        "efficientbioai, OpenVINO fp32": lambda: OpenVINOEngine(artifact / "model.onnx", "fp32", threads),
        "efficientbioai, OpenVINO int8 (LATENCY)": lambda: open_engine(
            artifact, manifest, "openvino", threads, hint="LATENCY"
        ),
        "efficientbioai, OpenVINO int8 (THROUGHPUT)": lambda: open_engine(
            artifact, manifest, "openvino", threads, hint="THROUGHPUT"
        ),
    }
    raw_tiles = None
    for name, make in engines.items():
        print(f"{name} …", flush=True)
        engine = make()
        pred = predictor(engine)
        sec, out, peak, energy = measure(lambda p=pred: p(image).output, args.repeats, meter)
        rows[name] = dict(sec=sec, out=out, peak=peak, energy=energy, tiles=len(pred.grid(image.shape[1:])))
        if "int8" in name:
            grid = pred.grid(image.shape[1:])
            raw_tiles = raw_tiles or [grid.read(image, t)[np.newaxis] for t in grid]

            def raw_run(e=engine, tiles=raw_tiles):
                for _ in e.map(iter(tiles)):
                    pass

            rsec, _, _, _ = measure(raw_run, args.repeats, meter)
            rows[name]["raw"] = rsec
        engine.close()

    torch_sec = rows["PyTorch fp32 + MONAI sliding window"]["sec"]
    body = []
    for name, r in rows.items():
        e_j, e_m = r["energy"]
        body.append(
            [
                name,
                f"{r['sec']:.2f} s",
                f"{torch_sec / r['sec']:.2f}x",
                r.get("tiles", 75),
                f"{r['raw']:.2f} s" if "raw" in r else "-",
                f"{r['raw'] / r['sec']:.0%}" if "raw" in r else "-",
                human_bytes(r["peak"]),
                f"{e_j:.0f} J ({e_m})" if e_j is not None else "-",
                f"{metrics.pearson(r['out'], ref):.5f}",
            ]
        )
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "monai", "openvino", "nncf"))
    print()
    print(
        table(
            [
                "method",
                "whole volume",
                "vs torch",
                "tiles",
                "raw engine",
                "efficiency",
                "peak extra RSS",
                "energy",
                "Pearson vs torch",
            ],
            body,
            title=f"{'x'.join(map(str, args.shape))} volume, tile {'x'.join(map(str, TILE))}, overlap {OVERLAP}, "
            f"gaussian; {cpu_model()}, {threads} threads; median of {args.repeats}; {versions}",
        )
    )
    best = min((n for n in rows if "int8" in n), key=lambda n: rows[n]["sec"])
    ratio = torch_sec / rows[best]["sec"]
    eff = rows[best]["raw"] / rows[best]["sec"]
    print(f"fastest int8 row: {best}")
    print(
        f"target ≥ {SPEED_TARGET:.0f}x end-to-end: {'MET' if ratio >= SPEED_TARGET else 'NOT MET'} ({ratio:.2f}x)"
    )
    print(
        f"target efficiency ≥ {EFFICIENCY_TARGET:.0%}: {'MET' if eff >= EFFICIENCY_TARGET else 'NOT MET'} ({eff:.0%})"
    )
    meter.close()


if __name__ == "__main__":
    main()
