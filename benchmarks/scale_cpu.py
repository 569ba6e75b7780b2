"""CPU benchmark: peak memory and throughput of `infer` on large volumes: in memory vs out of core vs Dask.

The network is the 3D MONAI UNet of benchmarks/infer_cpu.py (channels 16..256, random weights seeded with
torch.manual_seed(0)), compressed to int8 with ``efficientbioai.compress`` (calibration on a generated
nuclei volume, tile 16×128×128). Each volume is generated as a uint16 zarr store (chunks 16×256×256),
slab by slab, never whole in memory: smooth intensity waves plus noise (throughput does not depend on the
content, no tile is skipped).

For every depth (``--depths``, volumes depth × Y × X with ``--size Y X``, default 2048 × 2048) each row runs
``efficientbioai.infer.infer`` once in a fresh subprocess (this script with ``--child``), tile 16×128×128,
overlap 0.25, gaussian blending, zarr output:

* in memory: ``tiling.out_of_core: false`` (the whole float32 output in RAM); skipped,
  with the reason printed, when its estimated need (6 bytes per voxel) exceeds the available memory;
* out of core: ``tiling.out_of_core: true`` (bounded band, chunks flushed as they complete);
* Dask: ``distributed: {scheduler: local, n_workers: 2, threads_per_worker: 1}`` (worker processes, one
  engine thread each).

Peak RSS: the parent samples the summed RSS of the child and all its descendants (Dask worker processes
included) every 20 ms with psutil, minus nothing (the whole process tree). Throughput: voxels / the
seconds ``infer`` reports for the image (tiles read to output written; for Dask the stream's wall time).
The single-process rows use ``--threads`` engine threads (default: all cores).

Localisation rows (``--localize-depth``, default 64): a sparse float32 zarr volume of that depth (a cylinder of
tissue through the stack holding 25% of the voxels, benchmarks/localize_cpu.py's generator), out of core
without and with ``tiling.localize``; the speed-up is the ratio of the two ``infer()`` calls' wall times.

Run:  python benchmarks/scale_cpu.py [--depths 64 128 300] [--size 2048 2048] [--threads N] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from compress_cpu import cpu_model  # sibling benchmark scripts (their folder is on sys.path)
from infer_cpu import OVERLAP, int8_artifact, quiet_libraries

from efficientbioai.engines import default_threads
from efficientbioai.tables import table

TILE = (16, 128, 128)
RESULT = "@@RESULT@@ "
BYTES_PER_VOXEL_IN_MEMORY = 6  # float32 output + the written copy's slabs, with room to spare
ROWS = {
    "in_memory": "in memory (out_of_core: false)",
    "out_of_core": "out of core (out_of_core: true)",
    "dask": "Dask LocalCluster 2 workers x 1 thread",
}
LOCALIZE_ROWS = {  # on a sparse volume (a 25% cylinder of tissue through the stack), out of core
    "sparse": "sparse sample, out of core, no localisation",
    "sparse_localize": "sparse sample, out of core + tiling.localize",
}


def make_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """A uint16 zarr volume written slab by slab (chunks 16 × 256 × 256)."""
    import zarr

    from efficientbioai.io import create_zarr

    arr = create_zarr(path, shape, np.uint16, "zyx", (16, 256, 256), path.stem)
    rng = np.random.default_rng(seed)
    y = np.arange(shape[1], dtype=np.float32)[:, None]
    x = np.arange(shape[2], dtype=np.float32)[None, :]
    for z0 in range(0, shape[0], 16):
        depth = min(16, shape[0] - z0)
        z = np.arange(z0, z0 + depth, dtype=np.float32)[:, None, None]
        wave = 1000 + 600 * np.sin(x / 37.0 + z / 11.0) * np.cos(y / 23.0)
        arr[z0 : z0 + depth] = (
            (wave + rng.normal(0, 60, (depth, *shape[1:]))).clip(0, 65535).astype(np.uint16)
        )
    assert isinstance(zarr.open_array(store=str(path), path="0", mode="r"), zarr.Array)


def prepare_artifact(work: Path, threads: int, calib_tiles: int) -> Path:
    t0 = time.perf_counter()
    m = int8_artifact(work, threads, calib_tiles)
    print(
        f"  compressed to int8 in {time.perf_counter() - t0:.0f} s; one 16x128x128 tile: torch "
        f"{m.latency['original']['median_ms']:.0f} ms, int8 {m.latency['compressed']['median_ms']:.0f} ms",
        flush=True,
    )
    return work / "artifact"


def infer_config(row: str, work: Path, volume: Path, threads: int) -> dict:
    cfg = {
        "model": str(work / "artifact"),
        "input": str(volume),
        "output": str(work / f"out_{row}"),
        "output_format": "zarr",
        "energy": False,
        "overwrite": True,
        "threads": threads,
        "tiling": {"tile_shape": list(TILE), "overlap": OVERLAP, "out_of_core": row != "in_memory"},
    }
    if row == "dask":
        cfg["tiling"]["out_of_core"] = "auto"
        cfg["distributed"] = {"scheduler": "local", "n_workers": 2, "threads_per_worker": 1}
    if row == "sparse_localize":
        cfg["tiling"]["localize"] = {"enabled": True}
    return cfg


def child_main(args) -> None:
    quiet_libraries()
    from efficientbioai.config import InferConfig, validate_config
    from efficientbioai.infer import infer

    cfg = validate_config(json.loads(Path(args.child_config).read_text()), InferConfig)
    t0 = time.perf_counter()
    result = infer(cfg, quiet=True)
    wall = time.perf_counter() - t0
    run = result.images[0].runs[0]
    print(
        RESULT
        + json.dumps(
            {"seconds": run.seconds, "wall": wall, "voxels": run.voxels, "skipped": run.skipped_fraction}
        ),
        flush=True,
    )


class TreeRSS:
    """Peak summed RSS of a process and all its descendants, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self.root = psutil.Process(pid)
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_row(row: str, work: Path, volume: Path, threads: int) -> dict:
    cfg_path = work / f"{row}.json"
    cfg_path.write_text(json.dumps(infer_config(row, work, volume, threads)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--child-config", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = TreeRSS(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    lines = [line for line in out.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(out + err)
        raise SystemExit(f"row '{row}' failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT) :])
    result["peak_rss"] = sampler.peak
    shutil.rmtree(work / f"out_{row}", ignore_errors=True)
    return result


def localization_rows(work: Path, shape: tuple[int, int, int], threads: int) -> list[list[str]]:
    """Out of core on a sparse volume (a cylinder of tissue holding 25% of the voxels, float32 zarr),
    without and with ``tiling.localize``, each in a fresh process (as the other rows)."""
    from localize_cpu import write_sparse_volume

    volume = work / f"sparse_{shape[0]}.zarr"
    t0 = time.perf_counter()
    sample = write_sparse_volume(volume, shape)
    fraction = float(sample.disk().mean())
    print(
        f"  generated a sparse {shape} float32 volume, sample in {fraction:.0%} ({time.perf_counter() - t0:.0f} s)"
    )
    label = "x".join(map(str, shape)) + " sparse"
    results, rows = {}, []
    for row, name in LOCALIZE_ROWS.items():
        res = results[row] = run_row(row, work, volume, threads)
        note = f"{res['seconds']:.1f} s"
        if row == "sparse_localize":
            speedup = results["sparse"]["wall"] / res["wall"]
            note += f"; {speedup:.2f}x faster end to end; {res['skipped']:.0%} of the voxels skipped"
        print(f"  {label} {row}: {note}, peak RSS {res['peak_rss'] / 2**30:.2f} GiB", flush=True)
        rows.append(
            [
                label,
                name,
                f"{res['peak_rss'] / 2**30:.2f} GiB",
                f"{res['voxels'] / res['seconds'] / 1e6:.2f}",
                note,
            ]
        )
    shutil.rmtree(volume, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[64, 128, 300], help="volume depths")
    parser.add_argument(
        "--size", type=int, nargs=2, default=[2048, 2048], metavar=("Y", "X"), help="plane size"
    )
    parser.add_argument(
        "--threads", type=int, default=default_threads(), help="engine threads (single process)"
    )
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="what to run")
    parser.add_argument("--calib-tiles", type=int, default=16, help="int8 calibration tiles (default 16)")
    parser.add_argument(
        "--localize-depth",
        type=int,
        default=64,
        help="depth of the sparse volume for the localisation rows (0: no localisation rows)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    import psutil

    quiet_libraries(nncf=True)
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("openvino", "torch", "dask", "zarr", "numpy"))
    print(f"CPU: {cpu_model()} ({default_threads()} cores available); engine threads: {args.threads}")
    print(f"versions: {versions}; python {platform.python_version()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="scale_cpu-"))
    rows = []
    try:
        print(f"\n[1/2] compressing the 3D U-Net to int8 in {work}", flush=True)
        prepare_artifact(work, args.threads, args.calib_tiles)
        print("\n[2/2] one fresh process per row", flush=True)
        for depth in args.depths:
            shape = (depth, *args.size)
            voxels = int(np.prod(shape))
            volume = work / f"vol_{depth}.zarr"
            t0 = time.perf_counter()
            make_volume(volume, shape)
            print(
                f"  generated {shape} uint16 ({voxels * 2 / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s"
            )
            for row in args.rows:
                label = f"{depth}x{args.size[0]}x{args.size[1]}"
                if row == "in_memory":
                    need = voxels * BYTES_PER_VOXEL_IN_MEMORY
                    avail = psutil.virtual_memory().available
                    if need > 0.8 * avail:
                        why = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                        print(f"  {label} {row}: skipped ({why})", flush=True)
                        rows.append([label, ROWS[row], "skipped", "-", why])
                        continue
                res = run_row(row, work, volume, args.threads)
                mvox = res["voxels"] / res["seconds"] / 1e6
                print(
                    f"  {label} {row}: {res['seconds']:.1f} s, peak RSS {res['peak_rss'] / 2**30:.2f} GiB",
                    flush=True,
                )
                rows.append(
                    [
                        label,
                        ROWS[row],
                        f"{res['peak_rss'] / 2**30:.2f} GiB",
                        f"{mvox:.2f}",
                        f"{res['seconds']:.1f} s",
                    ]
                )
            shutil.rmtree(volume, ignore_errors=True)
        if args.localize_depth:
            rows += localization_rows(work, (args.localize_depth, *args.size), args.threads)
        print()
        print(
            table(
                ["volume (zarr)", "path", "peak RSS", "Mvoxel/s", "seconds / note"],
                rows,
                title=f"infer, 3D U-Net int8, tile {'x'.join(map(str, TILE))}, overlap {OVERLAP} "
                f"(peak RSS: whole process tree)",
            )
        )
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
