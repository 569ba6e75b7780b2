"""CPU benchmark: a whole 3D volume through MONAI's sliding_window_inference (PyTorch fp32 eager) vs our int8 engine.

The network is the 3D MONAI UNet of benchmarks/compress_cpu.py (channels 16..256, strides 2, 2 residual
units) with random weights seeded with torch.manual_seed(0): the numbers are timings and agreement
between two implementations of the same network, not segmentation quality. Its state dict is compressed
with ``efficientbioai.compress`` (kind monai, int8, calibration on a generated nuclei volume written as a
TIFF, tile 32x128x128) into a temporary artifact directory.

The volume is ``synthetic.nuclei(shape)`` (default 64x512x512, float32). Every method uses the same tile
(32x128x128), overlap 0.25, gaussian blending and batch size 1, hence the same 75-tile grid:

* PyTorch fp32 eager: ``monai.inferers.sliding_window_inference(..., mode="gaussian")`` under
  ``torch.inference_mode`` (what users run today);
* OpenVINO int8 end to end: our ``Predictor`` (built as ``efficientbioai infer`` builds it from the
  manifest) on the engine from ``open_engine``: tile reading, the pipelined engine and blending, with
  PERFORMANCE_HINT LATENCY and THROUGHPUT (the targets are checked on the row of ``infer``'s default);
* OpenVINO fp32 end to end: the artifact's model.onnx compiled in fp32, same Predictor (the same engine
  without quantization);
* raw engine: the same engine's ``map()`` over the same tiles, extracted into memory beforehand, outputs
  consumed without blending (for PyTorch: the network called on the same tiles in a loop). Pipeline
  efficiency = raw seconds / end-to-end seconds.

Each method runs in a fresh subprocess (this script with ``--child``) that loads the network, the volume,
the pre-extracted tiles and the energy meter, warms up on one tile, then times ``--repeats`` rounds of one
raw-engine pass and one whole-volume run (medians reported; interleaved so that drift hits both alike);
each whole-volume run is inside ``EnergyMeter().measure()``. Peak memory: a thread samples the RSS
(psutil) every 10 ms during the whole-volume runs; "peak extra RSS" is that peak minus the RSS after
setup, i.e. what inference adds (the kernel's high-water mark, reset before each run, is printed beside
it). Agreement: Pearson r of each stitched output vs MONAI's. The parent also reports how much CPU other
processes used while each method ran, and warns when the machine was not idle.

Run:  python benchmarks/infer_cpu.py [--threads N] [--repeats 3] [--shape 64 512 512] [--keep]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
from compress_cpu import cpu_model  # the sibling benchmark script (its folder is on sys.path)

from efficientbioai.benchmark.environment import machine_busy_seconds
from efficientbioai.engines import default_threads
from efficientbioai.tables import table

KWARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
}
TILE = (32, 128, 128)
OVERLAP = 0.25
VOLUME_SEED, CALIB_SEED = 1, 2
CALIB_SHAPE = (64, 256, 256)
TARGET_SPEEDUP, TARGET_EFFICIENCY = 8.0, 0.85
RESULT = "@@RESULT@@ "
# child name -> (row label, engine, PERFORMANCE_HINT)
ENGINES = {
    "int8-latency": ("OpenVINO int8, LATENCY hint", "int8", "LATENCY"),
    "int8-throughput": ("OpenVINO int8, THROUGHPUT hint", "int8", "THROUGHPUT"),
    "fp32": ("OpenVINO fp32 (same engine in fp32)", "fp32", "LATENCY"),
}
TORCH_LABEL = "PyTorch fp32 eager + MONAI sliding_window"
MIB = 2**20
BUSY_WARNING = 0.2  # cores used by other processes during a measurement that make its timings suspect


def default_hint() -> str:
    """The PERFORMANCE_HINT that ``efficientbioai infer`` compiles its OpenVINO engine with."""
    import inspect

    from efficientbioai.artifact import Artifact

    return inspect.signature(Artifact.open_engine).parameters["hint"].default


def quiet_libraries(nncf: bool = False) -> None:
    warnings.filterwarnings("ignore")
    if nncf:  # its progress bars and INFO lines during compress()
        import nncf as _nncf

        _nncf.set_log_level(logging.ERROR)


# ------------------------------------------------------------------------------------- measurement


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds in a background thread, keeps the maximum."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def high_water_mark() -> int | None:
    """The kernel's peak RSS of this process (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def timed_runs(fn, raw, repeats: int, meter) -> dict:
    """``repeats`` rounds of: the raw engine (``raw()``, timed), then one whole-volume run (``fn()``, timed,
    metered, its peak RSS sampled). Interleaving the two keeps machine drift out of their ratio. Returns
    the times, energy readings, peak RSS and the last whole-volume result."""
    out = {"seconds": [], "raw_seconds": [], "energy": [], "peak_rss": 0, "hwm": None}
    result = None
    for _ in range(repeats):
        result = None  # free the previous output first, as a user's loop over images would
        t0 = time.perf_counter()
        raw()
        out["raw_seconds"].append(time.perf_counter() - t0)
        hwm_reset = reset_high_water_mark()
        with PeakRSS() as peak, meter.measure() as m:
            t0 = time.perf_counter()
            result = fn()
            out["seconds"].append(time.perf_counter() - t0)
        out["peak_rss"] = max(out["peak_rss"], peak.peak)
        hwm = high_water_mark() if hwm_reset else None
        if hwm is not None:
            out["hwm"] = max(out["hwm"] or 0, hwm)
        r = m.reading
        out["energy"].append({"joules": r.joules, "method": r.method, "source": r.source})
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["result"] = result
    return out


def host_seconds(grid, image, channels: int) -> dict[str, float]:
    """The pipeline's own work for one volume, serially, with no engine running: reading every tile, and
    blending one (dummy) output per tile into fresh accumulators; for the blend also the kernel's share
    of it (first-touch page faults of the fresh accumulators, slow on VMs)."""
    from efficientbioai.tiling import Blender

    t0 = time.perf_counter()
    for t in grid:
        grid.read(image, t)
    read_s = time.perf_counter() - t0
    dummy = np.zeros((channels, *grid.tile), np.float32)
    r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
    blender = Blender(grid, channels, "gaussian")
    for t in grid:
        blender.add(t, dummy)
    blender.result()
    blend_s, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_THREAD)
    return {"read": read_s, "blend": blend_s, "blend_kernel": r1.ru_stime - r0.ru_stime}


# ------------------------------------------------------------------------------------------- children


def child_torch(work: Path, threads: int, repeats: int) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from efficientbioai.energy import EnergyMeter
    from efficientbioai.tiling import TileGrid

    torch.set_num_threads(threads)
    net = UNet(**KWARGS)
    net.load_state_dict(torch.load(work / "unet3d.pt", weights_only=True))
    net.eval()
    volume = np.load(work / "volume.npy")  # (1, Z, Y, X) float32, in memory
    x = torch.from_numpy(volume[np.newaxis])
    grid = TileGrid.build(volume.shape[1:], TILE, overlap=OVERLAP)  # MONAI's grid, for the raw runs
    tiles = [torch.from_numpy(grid.read(volume, t)[np.newaxis]) for t in grid]
    calls = [0]

    def predictor(tile):
        calls[0] += 1
        return net(tile)

    meter = EnergyMeter()
    baseline = rss()
    with torch.inference_mode():
        net(torch.zeros((1, 1, *TILE)))  # warm-up: one tile

    def run() -> np.ndarray:
        calls[0] = 0
        with torch.inference_mode():
            out = sliding_window_inference(
                x, roi_size=TILE, sw_batch_size=1, predictor=predictor, overlap=OVERLAP, mode="gaussian"
            )
        return out[0].numpy()

    def raw() -> None:
        with torch.inference_mode():
            for t in tiles:
                net(t)

    res = timed_runs(run, raw, repeats, meter)
    np.save(work / "out_torch.npy", res.pop("result"))
    meter.close()
    return {
        **res,
        "tiles": calls[0],
        "baseline_rss": baseline,
        "output": "out_torch.npy",
        "host": host_seconds(grid, volume, 1),
    }


def child_engine(name: str, work: Path, threads: int, repeats: int) -> dict:
    from efficientbioai.artifact import Artifact
    from efficientbioai.config import TilingConfig
    from efficientbioai.energy import EnergyMeter
    from efficientbioai.engines import OpenVINOEngine
    from efficientbioai.infer import Predictor
    from efficientbioai.processing import apply_steps

    _, precision, hint = ENGINES[name]
    artifact = Artifact(work / "artifact")
    manifest = artifact.manifest
    if precision == "fp32":
        engine = OpenVINOEngine(artifact.path(manifest.engines.onnx.path), "fp32", threads, hint=hint)
    else:
        engine = artifact.open_engine("openvino", threads, hint=hint)
    tiling = TilingConfig(tile_shape=list(TILE), overlap=OVERLAP, blend="gaussian", batch_size=1)
    predictor = Predictor.from_artifact(manifest, engine, tiling)
    volume = np.load(work / "volume.npy")  # (1, Z, Y, X) float32, in memory
    # the raw engine's input: the same tiles (and point-wise pre-processing, if any), in memory
    grid = predictor.grid(volume.shape[1:])
    batches = [grid.read(volume, t)[np.newaxis] for t in grid]
    if predictor.pre:
        batches = [apply_steps(b, list(predictor.pre), predictor.axes) for b in batches]
    meter = EnergyMeter()
    baseline = rss()
    predictor.warm_up(volume.shape[0])  # warm-up: one tile
    last = {}

    def run() -> np.ndarray:
        last["prediction"] = predictor(volume)
        return last["prediction"].output

    def raw() -> None:
        n = 0
        for out in engine.map(iter(batches)):  # outputs consumed, not blended
            n += len(out)
        assert n == len(batches), (n, len(batches))

    res = timed_runs(run, raw, repeats, meter)
    out_name = f"out_{name}.npy"
    np.save(work / out_name, res.pop("result"))
    host = host_seconds(grid, volume, predictor.out_channels)
    compiled = engine.compiled
    info = {k: str(compiled.get_property(k)) for k in ("OPTIMAL_NUMBER_OF_INFER_REQUESTS", "NUM_STREAMS")}
    meter.close()
    engine.close()
    return {
        **res,
        "tiles": last["prediction"].tiles,
        "baseline_rss": baseline,
        "output": out_name,
        "host": host,
        "engine_precision": engine.precision,
        "ov": info,
    }


def child_main(args) -> None:
    quiet_libraries()
    work = Path(args.workdir)
    if args.child == "torch":
        result = child_torch(work, args.threads, args.repeats)
    else:
        result = child_engine(args.child, work, args.threads, args.repeats)
    print(RESULT + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- parent


def int8_artifact(work: Path, threads: int, calib_tiles: int) -> dict:
    """A calibration TIFF, the seeded (random-weight) 3D U-Net and its plain int8 artifact
    (``work / "artifact"``); returns the manifest. Shared by the scale and localisation benchmarks.

    Speed benchmarks of random weights: the accuracy budget is switched off explicitly
    (``max_drop: null``), so that plain int8 is what gets timed, as before the default budget existed.
    """
    import torch
    from monai.networks.nets import UNet

    from efficientbioai.compress import compress
    from efficientbioai.config import CompressConfig, validate_config
    from efficientbioai.io import write_image
    from efficientbioai.synthetic import nuclei

    calib, _ = nuclei(CALIB_SHAPE, seed=CALIB_SEED)
    write_image(work / "calibration" / "nuclei.tif", calib, axes="zyx")
    torch.manual_seed(0)
    torch.save(UNet(**KWARGS).state_dict(), work / "unet3d.pt")
    cfg = validate_config(
        {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": KWARGS,
                "checkpoint": str(work / "unet3d.pt"),
                "axes": "bczyx",
            },
            "calibration": {
                "images": str(work / "calibration"),
                "tile_shape": list(TILE),
                "num_tiles": calib_tiles,
            },
            "quantize": {"precision": "int8", "max_drop": None},
            "engine": {"threads": threads, "latency_repeats": 3},
            "output": str(work / "artifact"),
        },
        CompressConfig,
    )
    return compress(cfg, quiet=True).manifest


def prepare(work: Path, shape: tuple[int, ...], threads: int, calib_tiles: int) -> dict:
    """Volume, calibration TIFF, seeded network and its int8 artifact in ``work``; the manifest."""
    from efficientbioai.synthetic import nuclei

    t0 = time.perf_counter()
    volume, _ = nuclei(shape, seed=VOLUME_SEED)
    np.save(work / "volume.npy", volume[np.newaxis].astype(np.float32))
    print(
        f"  generated the volume {shape} and a {CALIB_SHAPE} calibration TIFF ({time.perf_counter() - t0:.1f} s)"
    )

    t0 = time.perf_counter()
    m = int8_artifact(work, threads, calib_tiles)
    lat, fid = m.latency, m.fidelity
    print(
        f"  compressed to int8 in {time.perf_counter() - t0:.0f} s on {m.calibration.tiles} calibration "
        f"tiles; held-out tiles: Pearson r {fid['pearson']:.5f}; one tile: torch "
        f"{lat['original']['median_ms']:.0f} ms, int8 {lat['compressed']['median_ms']:.0f} ms"
    )
    return m


def child_result(cmd: list[str], name: str) -> tuple[dict, float]:
    """Run a child benchmark process; its RESULT record (plus ``other_cores``: CPU time used by everything
    else on the machine meanwhile, in cores on average) and its wall time."""
    busy0, own0, t0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    busy1, own1, wall = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child '{name}' failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT) :])
    result["other_cores"] = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return result, wall


def run_child(name: str, args, work: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        name,
        "--workdir",
        str(work),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
    ]
    result, wall = child_result(cmd, name)
    other = (
        ""
        if result["other_cores"] is None
        else f"; other processes used {result['other_cores']:.2f} cores meanwhile"
    )
    print(
        f"  {name}: median {statistics.median(result['seconds']):.2f} s per volume "
        f"(child ran {wall:.0f} s{other})",
        flush=True,
    )
    return result


def energy_cell(readings: list[dict]) -> str:
    joules = [r["joules"] for r in readings if r["joules"] is not None]
    if not joules:
        return f"- ({readings[0]['method'] if readings else 'unavailable'})"
    return f"{statistics.median(joules):.1f} ({readings[0]['method']})"


def report(results: dict[str, dict], pearson: dict[str, float], args, shape) -> None:
    torch_s = statistics.median(results["torch"]["seconds"])
    ours_name = next(n for n, (_, p, h) in ENGINES.items() if p == "int8" and h == default_hint())
    rows = []
    for name, res in results.items():
        sec = statistics.median(res["seconds"])
        raw = statistics.median(res["raw_seconds"])
        eff = f"{raw / sec:.0%} (raw {raw:.2f} s)"
        extra = (res["peak_rss"] - res["baseline_rss"]) / MIB
        rows.append(
            [
                TORCH_LABEL
                if name == "torch"
                else ENGINES[name][0] + (" (ours, infer's default)" if name == ours_name else ""),
                f"{sec:.2f}",
                f"{torch_s / sec:.2f}x",
                res["tiles"],
                eff,
                f"{extra:.0f} MiB",
                energy_cell(res["energy"]),
                "1 (reference)" if name == "torch" else f"{pearson[name]:.5f}",
            ]
        )
    header = [
        "method",
        "whole-volume s",
        "ratio vs torch",
        "tiles",
        "efficiency",
        "peak extra RSS",
        "energy J",
        "Pearson vs torch",
    ]
    title = (
        f"volume {tuple(shape)}, tile {TILE}, overlap {OVERLAP}, gaussian, batch 1, {args.threads} threads; "
        f"median of {args.repeats} runs, each method in its own process"
    )
    print()
    print(table(header, rows, title=title))

    print("\nnotes:")
    print(
        "  - random weights (torch.manual_seed(0), untrained): timings and agreement only, no segmentation quality"
    )
    sources = {r["source"] for res in results.values() for r in res["energy"] if r["joules"] is not None}
    if sources:
        print(f"  - energy per whole-volume run (median): {'; '.join(sorted(sources))}")
    print(
        "  - peak extra RSS: psutil samples every 10 ms during the whole-volume runs minus the RSS after setup "
        "(network, volume, tiles of the raw runs); VmHWM: the kernel's high-water mark, reset before each run. "
        "ru_maxrss is not usable in the children: it is the lifetime peak and includes the parent's RSS "
        "inherited at spawn (vfork + exec)"
    )
    for name, res in results.items():
        hwm = "-" if res["hwm"] is None else f"{(res['hwm'] - res['baseline_rss']) / MIB:.0f}"
        line = (
            f"  - {name}: runs {', '.join(f'{s:.2f}' for s in res['seconds'])} s; RSS after setup "
            f"{res['baseline_rss'] / MIB:.0f} MiB, extra peak sampled {(res['peak_rss'] - res['baseline_rss']) / MIB:.0f} "
            f"/ VmHWM {hwm} MiB (ru_maxrss {res['ru_maxrss'] / MIB:.0f} MiB)"
        )
        line += (
            f"; raw runs {', '.join(f'{s:.2f}' for s in res['raw_seconds'])} s; our pipeline's work alone "
            f"(serial, no engine): read tiles {res['host']['read']:.2f} s, blend {res['host']['blend']:.2f} s "
            f"({res['host']['blend_kernel']:.2f} s of it in the kernel)"
        )
        if "ov" in res:
            line += f"; float parts {res['engine_precision']}, OV {res['ov']}"
        print(line)
    busy = {n: r["other_cores"] for n, r in results.items() if r.get("other_cores") is not None}
    if busy and max(busy.values()) > BUSY_WARNING:
        print(
            "  - WARNING: other processes were using the CPU while these methods were measured ("
            + ", ".join(f"{n} {c:.2f}" for n, c in busy.items() if c > BUSY_WARNING)
            + " cores on average): the timings and ratios are unreliable; re-run on an idle machine"
        )
    elif busy:
        print(f"  - machine idle otherwise: other processes used at most {max(busy.values()):.2f} cores")
    hints = {n: results[n]["seconds"] for n in ("int8-latency", "int8-throughput") if n in results}
    if len(hints) == 2:
        fast, slow = sorted(hints, key=lambda n: statistics.median(hints[n]))
        tf, ts = statistics.median(hints[fast]), statistics.median(hints[slow])
        overlap = max(hints[fast]) >= min(hints[slow])
        print(
            f"  - PERFORMANCE_HINT: {ENGINES[fast][2]} is faster here ({tf:.2f} s vs {ts:.2f} s for "
            f"{ENGINES[slow][2]}, {ts / tf:.2f}x)"
            + ("; the runs overlap, so the difference is within run-to-run noise" if overlap else "")
        )

    ours = results[ours_name]
    sec = statistics.median(ours["seconds"])
    speedup = torch_s / sec
    eff = statistics.median(ours["raw_seconds"]) / sec
    print()
    print(f"targets, for infer's default ({ENGINES[ours_name][0]}):")
    print(
        f"target ≥ {TARGET_SPEEDUP:g}× end-to-end: {'MET' if speedup >= TARGET_SPEEDUP else 'NOT MET'} "
        f"({speedup:.2f}×)"
    )
    print(
        f"target efficiency ≥ {TARGET_EFFICIENCY:.0%}: {'MET' if eff >= TARGET_EFFICIENCY else 'NOT MET'} "
        f"({eff:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="CPU threads (default: all cores)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed whole-volume runs (default 3)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=[64, 512, 512], metavar=("Z", "Y", "X"), help="volume shape"
    )
    parser.add_argument("--calib-tiles", type=int, default=32, help="int8 calibration tiles (default 32)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", choices=["torch", *ENGINES], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    shape = tuple(args.shape)
    if any(s < t for s, t in zip(shape, TILE, strict=True)):
        parser.error(f"--shape {shape} must be at least the tile {TILE} along every axis")

    quiet_libraries(nncf=True)
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("openvino", "torch", "monai", "nncf", "numpy")
    )
    print(f"CPU: {cpu_model()} ({default_threads()} cores available); threads: {args.threads}")
    print(f"versions: {versions}; python {platform.python_version()}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="infer_cpu-"))
    try:
        print(f"\n[1/3] preparing in {work}", flush=True)
        prepare(work, shape, args.threads, args.calib_tiles)
        print("\n[2/3] timing each method in a fresh process", flush=True)
        results = {name: run_child(name, args, work) for name in ("torch", *ENGINES)}
        print("\n[3/3] agreement with MONAI's output", flush=True)
        from efficientbioai import metrics

        ref = np.load(work / results["torch"]["output"])
        pearson = {
            name: metrics.pearson(np.load(work / res["output"]), ref)
            for name, res in results.items()
            if name != "torch"
        }
        report(results, pearson, args, shape)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
