"""Cluster check: ``efficientbioai infer`` with ``distributed: {scheduler: slurm}`` on a real SLURM cluster,
against the single-process run of the same config.

Needs a working SLURM (``sinfo`` answers, ``sbatch`` submits) whose compute nodes see this machine's
paths (the artifact, the volume and the output folder: a shared file system, or one node) and can reach
this machine over TCP (the Dask scheduler runs here, in the ``infer`` process). For a one-node SLURM in
a container, ``benchmarks/slurm_node.sh`` starts munge, slurmctld and slurmd.

What it does, each step a real ``efficientbioai`` CLI subprocess:

1. writes a uint16 OME-Zarr volume (``--shape``, default 48x384x352: several Dask blocks) holding a
   sparse sample (the cylinder of benchmarks/localize_cpu.py) and compresses the seeded 3D U-Net of
   benchmarks/infer_cpu.py to int8 (or takes ``--artifact``);
2. runs ``infer`` once in one process (out of core) and once with ``distributed: scheduler: slurm``
   (dask-jobqueue's SLURMCluster: ``--workers`` jobs of one core each, the python of this interpreter),
   with and without ``tiling.localize``;
3. compares the outputs (max |difference|, target ≤ 1e-5) and lists the SLURM jobs that ran the workers
   (from dask-jobqueue's job logs).

Run:  python benchmarks/slurm_check.py [--workers 2] [--shape 48 384 352] [--artifact DIR] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from localize_cpu import Sample, SparseVolume  # sibling benchmark scripts (their folder is on sys.path)

from efficientbioai.tables import table

TILE = (16, 64, 64)
BLOCK = (24, 192, 192)
TARGET = 1e-5


def slurm_ready() -> str:
    """``sinfo``'s one-line summary, or exit with what is missing."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        sys.exit(
            "no SLURM here (sinfo / sbatch not found): see benchmarks/slurm_node.sh for a one-node SLURM"
        )
    done = subprocess.run(["sinfo", "-h", "-o", "%P %a %D %t"], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        sys.exit(f"sinfo failed ({done.stderr.strip()}): is slurmctld running?")
    return " | ".join(done.stdout.split("\n")).strip(" |")


def write_volume(path: Path, shape) -> None:
    from efficientbioai.io import write_image

    volume = SparseVolume(Sample.filling(shape), seed=5)
    data = np.clip(volume[0 : shape[0]] * 1000, 0, 65535).astype(np.uint16)
    write_image(path, data, axes="zyx")


def run_infer(work: Path, name: str, cfg: dict) -> float:
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "efficientbioai", "infer", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{name}: infer failed (rc {done.returncode})\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  {name}: {seconds:.1f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="SLURM jobs, one Dask worker each (default 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=[48, 384, 352], metavar=("Z", "Y", "X"))
    parser.add_argument("--artifact", help="an int8 3D artifact to use instead of compressing one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    print(f"SLURM: {slurm_ready()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="slurm_check-"))
    try:
        print(f"\n[1/3] preparing in {work}", flush=True)
        write_volume(work / "volume.zarr", tuple(args.shape))
        if args.artifact:
            artifact = Path(args.artifact).resolve()
        else:
            from infer_cpu import int8_artifact, quiet_libraries

            quiet_libraries(nncf=True)
            int8_artifact(work, 2, 8)
            artifact = work / "artifact"
        print("\n[2/3] infer: one process vs SLURM", flush=True)
        rows = []
        for localize in (False, True):
            outputs, seconds = {}, {}
            for mode in ("single", "slurm"):
                name = f"{mode}{'_localize' if localize else ''}"
                cfg = {
                    "model": str(artifact),
                    "input": str(work / "volume.zarr"),
                    "output": str(work / name),
                    "energy": False,
                    "overwrite": True,
                    "tiling": {
                        "tile_shape": list(TILE),
                        "overlap": 0.25,
                        "out_of_core": "true",
                        "localize": {"enabled": localize},
                    },
                }
                if mode == "slurm":
                    cfg["distributed"] = {
                        "scheduler": "slurm",
                        "n_workers": args.workers,
                        "block_shape": list(BLOCK),
                        "cluster_kwargs": {
                            "cores": 1,
                            "processes": 1,
                            "memory": "3GB",
                            "walltime": "00:30:00",
                            "python": sys.executable,
                            "log_directory": str(work / f"logs_{name}"),
                        },
                    }
                seconds[mode] = run_infer(work, name, cfg)
                outputs[mode] = work / name / "volume.zarr"
            import zarr

            a = zarr.open_array(str(outputs["single"]), path="0", mode="r")[:]
            b = zarr.open_array(str(outputs["slurm"]), path="0", mode="r")[:]
            logs = work / f"logs_{'slurm_localize' if localize else 'slurm'}"
            jobs = sorted(p.stem.rsplit("-", 1)[-1] for p in logs.glob("*.err"))
            diff = float(np.abs(a.astype(np.float64) - b).max())
            rows.append(
                [
                    "tiling.localize" if localize else "whole volume",
                    f"{seconds['single']:.1f}",
                    f"{seconds['slurm']:.1f}",
                    ", ".join(jobs) or "none found",
                    f"{diff:.3g}",
                    "yes" if diff <= TARGET else "NO",
                ]
            )
        print("\n[3/3] results\n")
        title = (
            f"volume {tuple(args.shape)} uint16 zarr, 3D U-Net int8, tile {TILE}, Dask blocks {BLOCK}; "
            f"{args.workers} SLURM jobs x 1 core; seconds of the whole CLI call"
        )
        header = ["run", "one process s", "SLURM s", "SLURM jobs (workers)", "max |diff|", f"≤ {TARGET:g}"]
        print(table(header, rows, title=title))
        if any(r[-1] == "NO" for r in rows):
            sys.exit(1)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
