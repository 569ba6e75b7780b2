"""The ``efficientbioai`` command: thin sub-commands that parse, load a config, call the library, print."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from efficientbioai import __version__
from efficientbioai.errors import EfficientBioAIError

COMPRESS_HELP = """\
Compress a model into a fast engine and check it against the original on your images.

The config is YAML (relative paths are read from the current directory):

  model:
    kind: bioimageio          # torchscript | torch | monai | bioimageio | onnx | package.module:MyParser
    path: path/to/package     # model file or bioimage.io package (folder, .zip or yaml)
    # axes: bczyx             # input axes for torchscript / torch / monai / onnx
    # factory: pkg.module:fn  # kind torch, with kwargs: {...} and checkpoint: weights.pt
    # name: UNet              # kind monai, with kwargs: {...} and checkpoint: weights.pt
  calibration:
    images: "data/calib/*.tif"  # your images (TIFF / NPY)
    num_tiles: 32
    tile_shape: [256, 256]
  quantize:
    precision: int8           # fp32 | fp16 | bf16 | int8
  fidelity:
    max_pearson_drop: 0.01    # fail when the compressed model drifts further
  output: runs/my_model_int8

Every key with its description and default: `efficientbioai schema compress`.
"""


def _cmd_compress(args) -> int:
    from efficientbioai.compress import compress
    from efficientbioai.config import CompressConfig, load_config

    overrides = {"output": args.output, "overwrite": True if args.overwrite else None}
    cfg = load_config(args.config, CompressConfig, overrides)
    result = compress(cfg, quiet=args.quiet)
    print(result.table())
    return 0


INFER_HELP = """\
Run a compressed engine over whole 2D / 3D images with sliding-window tiling.

The config is YAML (relative paths are read from the current directory):

  model: runs/my_model_int8     # an artifact directory written by `efficientbioai compress`
  # backend: openvino           # CPU: openvino | onnxruntime | torch; NVIDIA GPU: tensorrt | torch-cuda |
                                # onnxruntime-cuda | onnxruntime-tensorrt (default: the GPU engine when a GPU
                                # is present, else the artifact's best CPU engine; infer says which)
  input: "data/images/*.tif"    # a file, a glob, a folder, or a zarr / OME-Zarr store
  output: runs/predictions      # TIFF by default, zarr for zarr inputs (output_format: zarr)
  tiling: {tile_shape: [256, 256], overlap: 0.25, blend: gaussian, batch_size: 1}
  # targets: "data/masks/*.tif" # task metrics against these (task: restoration | semantic | instance)
  # compare_with_original: true # also run the original model and report both

Every key with its description and default: `efficientbioai schema infer`.
"""


def _cmd_infer(args) -> int:
    from efficientbioai.config import InferConfig, load_config
    from efficientbioai.infer import infer

    overrides = {"output": args.output, "overwrite": True if args.overwrite else None}
    cfg = load_config(args.config, InferConfig, overrides)
    result = infer(cfg, quiet=args.quiet)
    print(result.table())
    return 0


BENCHMARK_HELP = """\
Measure the original model against compressed variants on whole images: latency, throughput, peak
memory, energy, model size and the task metric, with ratios; writes report.json, report.md and a
self-contained report.html (plots and image panels) into the output folder.

The config is YAML (relative paths are read from the current directory):

  model: {kind: bioimageio, path: ../shared/models/unet2d_nuclei_broad}   # as in `compress`
  images: "data/images/*.tif"       # or {path: ..., axes: ..., targets: ...}, or
                                    # {generate: nuclei, shape: [512, 512]}, or a list of those
  # targets: "data/masks/*.tif"     # ground truth, with task: restoration | semantic | instance
  compress: {calibration: {num_tiles: 32}}   # compress keys shared by every variant
  variants:                         # each: a name + compress keys merged into the shared ones
    - {name: bf16, quantize: {precision: bf16}}
    - {name: int8, quantize: {precision: int8}}
  runs: {warmup: 1, repeats: 5}
  output: runs/benchmark

Ready configs: configs/benchmark_*.yaml. Every key: `efficientbioai schema benchmark`.
"""


def _cmd_benchmark(args) -> int:
    from efficientbioai.benchmark import benchmark, load_benchmark_config

    overrides = {"output": args.output, "overwrite": True if args.overwrite else None}
    cfg = load_benchmark_config(args.config, overrides)
    result = benchmark(cfg, quiet=args.quiet, source=str(args.config))
    print(result.markdown)
    print(f"reports: {result.files['markdown']}, {result.files['html']}, {result.files['json']}")
    return 0


def _cmd_demo(args) -> int:
    from efficientbioai.demo import run_demo

    print(run_demo(args.output, quiet=args.quiet))
    return 0


def _cmd_doctor(args) -> int:
    from efficientbioai.doctor import diagnose

    report = diagnose(args.config)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.text())
    return 0 if report.ok else 1


DOCTOR_HELP = """\
What this machine can run: engines and libraries with their versions, the CPU instructions that decide
int8 / bf16 speed (AVX-512, VNNI, AMX, BF16), GPU / driver / CUDA / TensorRT, whether energy is measured
(RAPL, NVML) or estimated, free memory and disk, what that means, and the command that installs each
missing piece.

With --config (a compress, infer or benchmark config) it also checks what that config needs (the
cellpose extra, a GPU and TensorRT, Dask...) and exits with status 1 naming what is missing.
"""


def _cmd_export_bioimageio(args) -> int:
    from efficientbioai.export_bioimageio import export_bioimageio

    res = export_bioimageio(
        args.artifact,
        args.output,
        sample=args.sample,
        sample_axes=args.sample_axes,
        name=args.name,
        license=args.license,
        authors=args.author,
        overwrite=args.overwrite,
    )
    v = res["validation"]
    print(f"bioimage.io package: {res['output']}")
    print(
        f"validated with bioimageio.spec {v['bioimageio.spec']}: {v['status']} (format {v['format_version']})"
        + (f", {len(v['warnings'])} warning(s)" if v["warnings"] else "")
    )
    for w in v["warnings"]:
        print(f"  warning: {w}")
    print(f"test tensors: {res['test_output']}", end="")
    if res["engine_pearson"] is not None:
        print(f"; the compressed engine reproduces the test output at Pearson r {res['engine_pearson']:.5f}")
    else:
        print()
    return 0


EXPORT_HELP = """\
Write a compressed model (an artifact directory from `efficientbioai compress`) as a bioimage.io model
package (format 0.5): ONNX weights (the artifact's model.onnx), the OpenVINO engine and the manifest as
attachments, test tensors (the source package's, or a tile of a calibration image / --sample and the
weights' output on it), a cover, and a README describing the compression and its fidelity. The package
is validated with bioimageio.spec (pip install "efficientbioai[bioimageio]") before it is written.
"""


def _cmd_schema(args) -> int:
    from efficientbioai.benchmark import BenchmarkConfig
    from efficientbioai.config import CompressConfig, InferConfig

    schemas = {"compress": CompressConfig, "infer": InferConfig, "benchmark": BenchmarkConfig}
    print(json.dumps(schemas[args.which].model_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efficientbioai",
        description="Compress bioimage deep-learning models into fast inference engines.",
    )
    parser.add_argument("--version", action="version", version=f"efficientbioai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "compress",
        help="compress a model into an engine (int8 / bf16 / fp16 / fp32)",
        description=COMPRESS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--output", "-o", help="artifact directory (overrides the config's output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact directory")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the final table")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser(
        "infer",
        help="run a compressed engine over whole images (sliding window), with metrics and energy",
        description=INFER_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--output", "-o", help="output folder (overrides the config's output)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the final table")
    p.set_defaults(func=_cmd_infer)

    p = sub.add_parser(
        "benchmark",
        help="original vs compressed variants on whole images: latency, memory, energy, size, accuracy; "
        "JSON / Markdown / HTML report",
        description=BENCHMARK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--output", "-o", help="report folder (overrides the config's output)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous benchmark in the folder")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the final report")
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser(
        "demo",
        help="no files needed: train a small nuclei U-Net, compress it to int8, compare it with the original",
        description="Builds everything it needs (a small U-Net trained for a few seconds on generated "
        "nuclei images), compresses it to an int8 OpenVINO engine, runs the original and the compressed "
        "model over a generated 2048×2048 image and prints the comparison. About a minute on 2 cores.",
    )
    p.add_argument(
        "--output", "-o", default="runs/demo", help="folder for the demo's files (default: runs/demo)"
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print only the final tables")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "doctor",
        help="check this machine: engines, CPU features (VNNI, AMX, bf16), GPU, energy meters, memory; "
        "with --config, whether that config can run here",
        description=DOCTOR_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "-c", help="a compress / infer / benchmark config to check")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser(
        "export-bioimageio",
        help="write a compressed model as a validated bioimage.io package (folder or .zip)",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifact", "-a", required=True, help="artifact directory written by `compress`")
    p.add_argument("--output", "-o", required=True, help="package folder, or a .zip file")
    p.add_argument("--sample", help="image for the test tensors (default: the first calibration image)")
    p.add_argument("--sample-axes", help="axes of --sample, e.g. yx, zyx, cyx (default: inferred)")
    p.add_argument("--name", help="the package's name (default: '<model> <precision> (efficientbioai)')")
    p.add_argument(
        "--license", help="SPDX license id (default: the source bioimage.io package's; required otherwise)"
    )
    p.add_argument("--author", action="append", help="an author's name (repeat for several)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.set_defaults(func=_cmd_export_bioimageio)

    p = sub.add_parser("schema", help="print the JSON schema of a config (for editors and docs)")
    p.add_argument("which", choices=["compress", "infer", "benchmark"], nargs="?", default="compress")
    p.set_defaults(func=_cmd_schema)
    return parser


def _short_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _short_warning
    if getattr(args, "quiet", False):
        warnings.filterwarnings("ignore")
    from efficientbioai.io.files import disk_full, disk_full_error

    try:
        return args.func(args)
    except KeyboardInterrupt:
        _interrupted()
        return 130
    except Exception as exc:
        full = disk_full(exc)  # whatever step met it (ONNX export, OpenVINO, TIFF writer): said as it is
        if full is not None:
            exc = disk_full_error(full)
        if not isinstance(exc, EfficientBioAIError):
            raise
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  how to fix: {exc.fix}", file=sys.stderr)
        return 2


def _interrupted() -> None:
    """What an interrupted command left: the resumable part of out-of-core outputs, else nothing."""
    from efficientbioai.io.chunked import in_progress

    kept = in_progress()
    if not kept:
        print("interrupted: nothing unfinished was left in the output", file=sys.stderr)
        return
    print("interrupted: the finished part of these outputs was kept for resuming:", file=sys.stderr)
    for store, path in kept:
        print(f"  {path.name}: {store}", file=sys.stderr)
    print(
        "  run the same command again to go on where it stopped (with other settings or another model "
        "it starts afresh); delete the .partial folders to discard them",
        file=sys.stderr,
    )


if __name__ == "__main__":
    raise SystemExit(main())
