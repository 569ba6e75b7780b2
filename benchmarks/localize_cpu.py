"""CPU benchmark: ``efficientbioai infer`` end to end on a sparse 3D volume, with and without sample localisation.

The volume (default 64x2048x2048 float32 as an OME-Zarr store, so input and output are zarr and the run
is out of core, as for a whole light-sheet volume; or with ``--format npy`` a memory-mapped ``.npy``,
with a TIFF output blended in memory; written slab by slab) holds a cylinder of "cleared tissue" through
the whole stack that fills 25% of the voxels: tissue autofluorescence plus textured nuclei
(``synthetic.nuclei`` patterns, repeated), on a dim noisy background. The network is the 3D MONAI UNet of
benchmarks/infer_cpu.py (random weights, seeded) compressed to int8 by that script's ``prepare``;
``infer`` runs it with tile 32x64x64, overlap 0.25, gaussian blending, batch 1, energy metering off.

Each run is a fresh process (this script with ``--child``) that calls ``efficientbioai.infer.infer`` once;
runs with and without ``tiling.localize.enabled`` alternate, ``--repeats`` times each (medians reported).
"infer s" is the whole ``infer()`` call: opening and compiling the engine, warm-up, the localisation pass,
tiles, blending and writing the output; "latency s" is the whole-image latency ``infer`` reports; "CPU s"
is the CPU time of the ``infer()`` call (all threads; less sensitive than wall time to other processes
on a shared machine). The outputs of the last two runs are compared inside the sample (the generated
cylinder), slab by slab.

Why tile 32x64x64 and 2048x2048 planes: a tile runs when its inner region touches the sample, so the
ring of partly covered tiles around it bounds the speed-up (tiles run / all tiles, for this 25% cylinder
and overlap 0.25): tile 32x128x128 runs 64-84% of the tiles on 64x512x512 (depending on where the
sample sits), 38% on 64x1024x1024, 33% on 64x2048x2048; tile 32x64x64 runs 37% on 64x768x768, 33% on
64x1024x1024 and 30% on 64x1536x1536. The fixed costs of a run (opening the engine, the localisation
pass, writing the output) do not shrink.

``measure_localization`` is the measurement as a function (for benchmarks/scale_cpu.py);
``write_sparse_volume`` writes the volume in bounded memory (any size).

Run:  python benchmarks/localize_cpu.py [--threads N] [--repeats 2] [--shape 64 2048 2048] [--tile 32 64 64]
      [--format zarr|npy]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from compress_cpu import cpu_model  # sibling benchmark scripts (their folder is on sys.path)
from infer_cpu import OVERLAP, RESULT, child_result, own_cpu_seconds, prepare, quiet_libraries

from efficientbioai.engines import default_threads
from efficientbioai.tables import table

SAMPLE_FRACTION = 0.25
TARGET_SPEEDUP = 2.5
TEXTURE_SHAPE = (32, 128, 128)  # the nuclei pattern, repeated through the sample
SLAB = 16  # planes generated (and compared) at once


@dataclass(frozen=True)
class Sample:
    """A cylinder along z: every plane holds the same disk (centre and radius in pixels)."""

    shape: tuple[int, int, int]
    centre: tuple[float, float]
    radius: float

    @classmethod
    def filling(cls, shape, fraction: float = SAMPLE_FRACTION) -> Sample:
        _, ny, nx = shape
        return cls(tuple(shape), (ny * 0.45, nx * 0.55), float(np.sqrt(fraction * ny * nx / np.pi)))

    def disk(self) -> np.ndarray:
        ny, nx = self.shape[1:]
        yy, xx = np.ogrid[:ny, :nx]
        return (yy - self.centre[0]) ** 2 + (xx - self.centre[1]) ** 2 <= self.radius**2


class SparseVolume:
    """A lazily generated (Z, Y, X) float32 volume: tissue (autofluorescence plus repeated nuclei
    patterns) inside ``sample``'s cylinder, dim noisy background outside. Planes are generated on access
    (seeded per plane), so writing it needs memory for a few planes only, whatever its size."""

    def __init__(self, sample: Sample, seed: int = 3):
        from efficientbioai.synthetic import nuclei

        self.sample, self.seed = sample, seed
        self.shape, self.dtype, self.ndim = sample.shape, np.dtype(np.float32), 3
        self.texture, _ = nuclei(TEXTURE_SHAPE, seed=seed, density=1.5)
        self.disk = sample.disk()

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        zs = range(*key[0].indices(self.shape[0]))
        ny, nx = self.shape[1:]
        ty, tx = np.arange(ny) % TEXTURE_SHAPE[1], np.arange(nx) % TEXTURE_SHAPE[2]
        out = np.empty((len(zs), ny, nx), np.float32)
        for i, z in enumerate(zs):
            noise = np.random.default_rng([self.seed, z]).standard_normal((ny, nx), np.float32)
            tissue = self.texture[z % TEXTURE_SHAPE[0]][np.ix_(ty, tx)]
            out[i] = 0.05 + 0.01 * noise + self.disk * (0.15 + tissue)
        return out[(slice(None), *key[1:])]


def write_sparse_volume(path: Path, shape, seed: int = 3) -> Sample:
    """Write a :class:`SparseVolume` of ``shape`` slab by slab, as an OME-Zarr store (``*.zarr``) or a
    ``.npy`` file (memory-mapped when read); its sample."""
    from efficientbioai.io import write_image

    sample = Sample.filling(shape)
    volume = SparseVolume(sample, seed)
    if path.suffix == ".npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))
        for z0 in range(0, shape[0], SLAB):
            out[z0 : z0 + SLAB] = volume[z0 : z0 + SLAB]
        out.flush()
        del out
    else:
        write_image(path, volume, axes="zyx")
    return sample


def child_main(args) -> None:
    quiet_libraries()
    from efficientbioai.config import InferConfig, validate_config
    from efficientbioai.infer import infer

    work = Path(args.workdir)
    spec = json.loads((work / "spec.json").read_text())
    cfg = validate_config(
        {
            "model": spec["artifact"],
            "input": spec["volume"],
            "output": str(work / f"out_{args.child}"),
            "tiling": {
                "tile_shape": spec["tile"],
                "overlap": spec["overlap"],
                "blend": "gaussian",
                "batch_size": 1,
                "localize": {"enabled": args.child == "localize"},
            },
            "threads": args.threads,
            "energy": False,
            "overwrite": True,
        },
        InferConfig,
    )
    t0, c0 = time.perf_counter(), own_cpu_seconds()
    result = infer(cfg, quiet=True)
    wall, cpu = time.perf_counter() - t0, own_cpu_seconds() - c0
    run = result.images[0].runs[0]
    out = {
        "infer_seconds": wall,
        "infer_cpu_seconds": cpu,
        "latency_seconds": run.seconds,
        "tiles": run.tiles,
        "skipped": run.skipped,
        "skipped_fraction": run.skipped_fraction,
        "output": str(result.images[0].output),
        "record": result.as_dict(),
    }
    print(RESULT + json.dumps(out), flush=True)


def run_child(name: str, work: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--workdir", str(work)]
    cmd += ["--threads", str(threads)]
    result, _ = child_result(cmd, name)
    print(
        f"  {name}: infer {result['infer_seconds']:.2f} s (latency {result['latency_seconds']:.2f} s), "
        f"{result['skipped']}/{result['tiles']} tiles skipped"
        + (
            ""
            if result["other_cores"] is None
            else f"; other processes used {result['other_cores']:.2f} cores"
        ),
        flush=True,
    )
    return result


def max_abs_diff_inside(a: Path, b: Path, sample: Sample) -> tuple[float, float]:
    """(max |a - b| inside the sample, max |a - b| anywhere), read slab by slab."""
    from efficientbioai.io import read_image

    x, y = read_image(a), read_image(b)
    disk = sample.disk()
    inside = everywhere = 0.0
    for z0 in range(0, sample.shape[0], SLAB):
        d = np.abs(np.asarray(x[z0 : z0 + SLAB], np.float64) - np.asarray(y[z0 : z0 + SLAB], np.float64))
        inside = max(inside, float(d[:, disk].max()))
        everywhere = max(everywhere, float(d.max()))
    return inside, everywhere


def measure_localization(
    artifact: Path, volume: Path, sample: Sample, work: Path, *, tile, threads: int, repeats: int = 2
) -> dict:
    """``infer`` on ``volume`` with and without ``tiling.localize``, alternating runs in fresh processes.

    Returns per variant the runs, the medians, and the comparison of the last outputs inside the sample.
    """
    work.mkdir(parents=True, exist_ok=True)
    spec = {"artifact": str(artifact), "volume": str(volume), "tile": list(tile), "overlap": OVERLAP}
    (work / "spec.json").write_text(json.dumps(spec))
    runs: dict[str, list[dict]] = {"full": [], "localize": []}
    for r in range(repeats):
        for name in ("full", "localize") if r % 2 == 0 else ("localize", "full"):
            runs[name].append(run_child(name, work, threads))
    inside, anywhere = max_abs_diff_inside(
        Path(runs["full"][-1]["output"]), Path(runs["localize"][-1]["output"]), sample
    )
    med = {
        name: {
            key: statistics.median(r[key] for r in rs)
            for key in ("infer_seconds", "latency_seconds", "infer_cpu_seconds")
        }
        for name, rs in runs.items()
    }
    return {
        "runs": runs,
        "median": med,
        "speedup_infer": med["full"]["infer_seconds"] / med["localize"]["infer_seconds"],
        "speedup_latency": med["full"]["latency_seconds"] / med["localize"]["latency_seconds"],
        "speedup_cpu": med["full"]["infer_cpu_seconds"] / med["localize"]["infer_cpu_seconds"],
        "max_abs_diff_inside": inside,
        "max_abs_diff_anywhere": anywhere,
        "sample_fraction": float(sample.disk().mean()),
        "format": "zarr" if volume.suffix == ".zarr" else "npy (memory-mapped)",
    }


def report(res: dict, shape, tile, threads: int, repeats: int) -> str:
    rows = []
    for name, label in (("full", "infer, no localisation"), ("localize", "infer, tiling.localize")):
        med, last = res["median"][name], res["runs"][name][-1]
        rows.append(
            [
                label,
                f"{med['infer_seconds']:.2f}",
                f"{med['latency_seconds']:.2f}",
                f"{med['infer_cpu_seconds']:.1f}",
                "1.00x" if name == "full" else f"{res['speedup_infer']:.2f}x",
                "1.00x" if name == "full" else f"{res['speedup_latency']:.2f}x",
                "1.00x" if name == "full" else f"{res['speedup_cpu']:.2f}x",
                f"{last['tiles'] - last['skipped']}/{last['tiles']}",
                f"{last['skipped_fraction']:.1%}",
                "-" if name == "full" else f"{res['max_abs_diff_inside']:.3g}",
            ]
        )
    header = [
        "run",
        "infer s",
        "latency s",
        "CPU s",
        "speed-up (infer)",
        "speed-up (latency)",
        "speed-up (CPU s)",
        "tiles run",
        "voxels skipped",
        "max |diff| in sample",
    ]
    title = (
        f"volume {tuple(shape)} float32 {res['format']}, sample in {res['sample_fraction']:.1%} of the voxels; tile "
        f"{tuple(tile)}, overlap {OVERLAP}, int8 OpenVINO, {threads} threads; median of {repeats} runs each, "
        "alternating, each in a fresh process"
    )
    return table(header, rows, title=title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=default_threads(), help="CPU threads (default: all)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant (default 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 2048, 2048], metavar=("Z", "Y", "X"))
    parser.add_argument("--tile", type=int, nargs=3, default=[32, 64, 64], metavar=("Z", "Y", "X"))
    parser.add_argument(
        "--format",
        choices=["zarr", "npy"],
        default="zarr",
        help="input: OME-Zarr (zarr output, out of core; default) or memory-mapped .npy (TIFF output, in memory)",
    )
    parser.add_argument("--calib-tiles", type=int, default=16, help="int8 calibration tiles (default 16)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--reuse", help="a directory kept by --keep: reuse its artifact and volume")
    parser.add_argument("--child", choices=["full", "localize"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    quiet_libraries(nncf=True)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("openvino", "nncf", "numpy", "zarr"))
    print(f"CPU: {cpu_model()} ({default_threads()} cores available); threads: {args.threads}")
    print(f"versions: {versions}; python {platform.python_version()}", flush=True)
    work = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="localize_cpu-"))
    try:
        print(f"\n[1/3] preparing in {work}", flush=True)
        if not (work / "artifact" / "manifest.yaml").is_file():
            prepare(work, (32, 128, 128), args.threads, args.calib_tiles)  # the int8 artifact (tiny volume)
        volume = work / f"sparse.{args.format}"
        t0 = time.perf_counter()
        if args.reuse and volume.exists():
            sample = Sample.filling(tuple(args.shape))
        else:
            sample = write_sparse_volume(volume, tuple(args.shape))
        print(f"  sparse volume {tuple(args.shape)} ready ({time.perf_counter() - t0:.1f} s)", flush=True)
        print("\n[2/3] infer with and without localisation, alternating", flush=True)
        res = measure_localization(
            work / "artifact",
            volume,
            sample,
            work / "runs",
            tile=args.tile,
            threads=args.threads,
            repeats=args.repeats,
        )
        print("\n[3/3] results\n")
        print(report(res, args.shape, args.tile, args.threads, args.repeats))
        busy = [r["other_cores"] for rs in res["runs"].values() for r in rs if r["other_cores"] is not None]
        print("\nnotes:")
        for name, rs in res["runs"].items():
            secs = ", ".join(f"{r['infer_seconds']:.2f}" for r in rs)
            print(f"  - {name}: infer s per run {secs}")
        print(
            f"  - max |diff| anywhere (outside the sample: background value): {res['max_abs_diff_anywhere']:.3g}"
        )
        if busy:
            print(
                f"  - other processes used up to {max(busy):.2f} cores during the runs (2 = the whole machine)"
            )
        met = res["speedup_infer"] >= TARGET_SPEEDUP and res["max_abs_diff_inside"] == 0.0
        print(
            f"\ntarget ≥ {TARGET_SPEEDUP:g}× end to end with identical output inside the sample: "
            f"{'MET' if met else 'NOT MET'} ({res['speedup_infer']:.2f}×, max |diff| {res['max_abs_diff_inside']:.3g})"
        )
    finally:
        if args.keep or args.reuse:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
