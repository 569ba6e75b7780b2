"""CPU benchmark: int8 accuracy with NNCF's overflow fix on every layer vs the first only, native vs AVX2-capped.

x86 CPUs without a VNNI dot product (AVX2-only, AVX-512 without VNNI) sum int8 products in saturating
16-bit registers, so an int8 network whose weights use all 8 bits can lose accuracy there. NNCF's overflow
fix quantizes weights to 7 bits to leave headroom; ``quantize.overflow_fix`` chooses where: ``all_layers``
(our default) or ``first_layer`` (NNCF's default).

The real bioimage.io package ../shared/models/unet2d_nuclei_broad (``--model``) is compressed with
``efficientbioai.compress`` once per overflow_fix value: precision int8, strategy fixed, ``max_drop: null``
(plain int8 is kept whatever its accuracy: the raw int8 accuracy is what is measured), calibrated on 16
tiles of 256x256. Each artifact's OpenVINO int8 engine (openvino/model.xml, float parts in f32) then runs
on the package's 512x512 test input in two fresh processes (this script with ``--child``): native (this
CPU's full ISA) and capped to AVX2 with ``OV_CPU_MAX_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`` (they must be set
before openvino is imported, hence the subprocess), which makes OpenVINO behave as on an AVX2-only CPU.

Columns: Pearson r and max |diff| vs the original TorchScript model on the same input (both after the
package's pre- and post-processing, i.e. the sigmoid probabilities); median ms of one 512x512 image
(network only, after warm-up, ``--threads`` threads, ``--repeats`` runs); "same as native": Pearson r of
the capped engine's output vs the native one's. "int8 kernels" is the oneDNN primitive type of the int8
convolutions, read from OpenVINO's runtime graph: it shows which ISA the engine really used.

Run:  python benchmarks/overflow_fix_cpu.py [--model DIR] [--threads 2] [--repeats 10] [--keep]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np

from efficientbioai import cpu
from efficientbioai.tables import table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "unet2d_nuclei_broad"
FIXES = ("all_layers", "first_layer")
CAP = {v: "AVX2" for v in cpu.ISA_CAP_VARIABLES}
ISAS = {"native": {}, "AVX2-capped": CAP}
RESULT = "@@RESULT@@ "


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    import nncf

    nncf.set_log_level(logging.ERROR)


# ------------------------------------------------------------------------------------------ child


def int8_kernels(engine) -> str:
    """The oneDNN primitive types of the compiled graph's int8 (de)convolutions, with their counts."""
    kinds: Counter[str] = Counter()
    for op in engine.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) not in ("Convolution", "Deconvolution"):
            continue
        if info["runtimePrecision"].astype(str) in ("u8", "i8"):
            kinds[info["primitiveType"].astype(str)] += 1
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common()) or "none"


def child_main(args) -> None:
    """Run one engine on the saved input in this (fresh) process; print a JSON line with the results."""
    from efficientbioai.engines import OpenVINOEngine, median_latency_ms

    x = np.load(args.input)
    engine = OpenVINOEngine(args.xml, "int8", args.threads)  # float parts: INFERENCE_PRECISION_HINT f32
    np.save(args.output, engine(x))
    latency = median_latency_ms(engine, x, warmup=2, repeats=args.repeats)
    result = {
        "ms": latency["median_ms"],
        "float_precision": engine.precision,
        "kernels": int8_kernels(engine),
        "isa_cap": cpu.describe_cap(),
        "flags": cpu.flags_line(cpu.cpu_flags()),
    }
    engine.close()
    print(RESULT + json.dumps(result), flush=True)


def run_child(args, xml: Path, inp: Path, out: Path, env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in cpu.ISA_CAP_VARIABLES}
    env.update(env_extra)
    cmd = [sys.executable, __file__, "--child", "--xml", str(xml), "--input", str(inp)]
    cmd += ["--output", str(out), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"child failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len(RESULT) :])


# ----------------------------------------------------------------------------------------- parent


def compress_artifact(model: Path, fix: str, out: Path):
    from efficientbioai.compress import compress
    from efficientbioai.config import validate_config

    cfg = validate_config(
        {
            "model": {"kind": "bioimageio", "path": str(model)},
            "calibration": {"num_tiles": 16, "tile_shape": [256, 256]},
            "quantize": {"precision": "int8", "strategy": "fixed", "max_drop": None, "overflow_fix": fix},
            "engine": {"latency_repeats": 2},
            "output": str(out),
        }
    )
    return cfg, compress(cfg, quiet=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="bioimage.io package folder (default: ../shared/models/unet2d_nuclei_broad from the repo root)",
    )
    parser.add_argument("--threads", type=int, default=2, help="OpenVINO threads (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per engine (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (artifacts, .npy)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xml", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    if cpu.isa_cap():
        sys.exit(f"unset {cpu.describe_cap()} first: the 'native' rows must use this CPU's full ISA")
    model = args.model.resolve()
    if not (model / "bioimageio.yaml").is_file() and not (model / "rdf.yaml").is_file():
        sys.exit(f"no bioimage.io package at {model} (give one with --model)")

    quiet_libraries()
    from efficientbioai import metrics
    from efficientbioai.models import load_model
    from efficientbioai.processing import apply_steps

    cpu_name, raw = cpu.read_cpuinfo()
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("openvino", "nncf", "torch", "numpy"))
    print(f"CPU: {cpu_name}; flags: {cpu.flags_line(cpu.cpu_flags(raw, cap={}))}")
    print(f"capped rows: {cpu.describe_cap(CAP)} -> flags: {cpu.flags_line(cpu.cpu_flags(raw, cap=CAP))}")
    print(f"versions: {versions}; python {platform.python_version()}; threads: {args.threads}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="overflow_fix_cpu-"))
    try:
        rows, kernels, ref, inp = [], [], None, work / "input.npy"
        for fix in FIXES:
            print(f"\n[{fix}] compressing (int8, max_drop null) into {work / fix} ...", flush=True)
            cfg, result = compress_artifact(model, fix, work / fix)
            m = result.manifest
            if ref is None:  # the original TorchScript model on the package's test input
                import torch

                _, loaded = load_model(cfg.model)
                x = apply_steps(loaded.sample_inputs[0], m.input.preprocessing, m.input.axes)
                np.save(inp, x)
                with torch.inference_mode():
                    y = loaded.module(torch.from_numpy(x)).numpy()
                ref = apply_steps(y, m.output.postprocessing, m.input.axes)
            xml = result.output / (m.engines.openvino.path if m.engines.openvino else "openvino/model.xml")
            outs = {}
            for isa, env in ISAS.items():
                print(f"[{fix}] running the int8 engine, {isa}, in a fresh process ...", flush=True)
                res = run_child(args, xml, inp, work / f"{fix}-{isa}.npy", env)
                out = apply_steps(np.load(work / f"{fix}-{isa}.npy"), m.output.postprocessing, m.input.axes)
                outs[isa] = out
                same = "1 (itself)" if isa == "native" else f"{metrics.pearson(out, outs['native']):.6f}"
                rows.append(
                    [
                        fix,
                        isa,
                        f"{metrics.pearson(out, ref):.6f}",
                        f"{float(np.abs(out - ref).max()):.4f}",
                        f"{res['ms']:.1f}",
                        same,
                    ]
                )
                kernels.append(f"  {fix}, {isa}: {res['kernels']} (float parts {res['float_precision']})")
        header = [
            "overflow_fix",
            "ISA",
            "Pearson vs original",
            "max |diff|",
            "ms / 512x512",
            "same as native",
        ]
        title = (
            f"int8 engine ({model.name}, test input {tuple(np.load(inp).shape)}) vs original TorchScript, "
            f"after sigmoid; {args.threads} threads, median of {args.repeats}"
        )
        print()
        print(table(header, rows, title=title))
        print("int8 kernels (oneDNN primitive types of the int8 convolutions):")
        print("\n".join(kernels))
        print("timings are indicative only: other work may share this machine")
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
