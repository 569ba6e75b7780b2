"""GPU engines: TensorRT, torch-cuda, ONNX Runtime's GPU providers, NVML energy.

Two kinds of tests live here:

* tests that run everywhere (this project's CI has no GPU): the TensorRT-ready ONNX graphs that
  ``compress`` writes (fp16 / int8 / fp8 run in ONNX Runtime on the CPU and are compared with the
  original), the optimization profile, the config and manifest wiring, and the clear errors a machine
  without a GPU gives;
* tests marked ``needs_gpu`` / ``needs_tensorrt``, which run only where an NVIDIA GPU (and the tensorrt
  package) exist and skip with that reason elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tifffile
import torch
import yaml

from efficientbioai import metrics
from efficientbioai.compress import compress
from efficientbioai.compress.tensorrt import gpu_status, profile_covers, profile_shapes
from efficientbioai.compress.trt_graph import int8_to_fp8, quantize_qdq, signed_int8, to_low_precision
from efficientbioai.config import CompressConfig, InferConfig, validate_config
from efficientbioai.errors import ConfigError, EfficientBioAIError

from .conftest import TINY_UNET_KWARGS, blobs, run_cli, tiny_unet
from .manifests import manifest_stub

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU; none on this machine")
try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except ImportError:
    HAS_TRT = False
needs_tensorrt = pytest.mark.skipif(
    not (HAS_GPU and HAS_TRT), reason="needs an NVIDIA GPU and the tensorrt package (efficientbioai[gpu])"
)
no_gpu_here = pytest.mark.skipif(HAS_GPU, reason="checks the behaviour of machines without a GPU")


# ------------------------------------------------------------------------------------ helpers


def _onnx_of(net, shape, path: Path) -> Path:
    from efficientbioai.compress.export import export_onnx

    axes = "bczyx" if len(shape) == 5 else "bcyx"
    return export_onnx(net, np.zeros(shape, np.float32), path, axes)


def _ort(model_or_path, x: np.ndarray) -> np.ndarray:
    src = (
        model_or_path.SerializeToString()
        if isinstance(model_or_path, onnx.ModelProto)
        else str(model_or_path)
    )
    s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def unet3d_onnx(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A tiny 3D MONAI UNet (instance norm, PReLU, transposed convolutions) and blob tiles."""
    root = tmp_path_factory.mktemp("trt_onnx")
    path = _onnx_of(tiny_unet(3), (1, 1, 16, 32, 32), root / "model.onnx")
    tiles = [blobs((16, 32, 32), n=4, seed=s)[0][np.newaxis] for s in range(8)]
    return path, tiles


# ---------------------------------------------------------------------- graphs (CPU, ONNX Runtime)


def test_fp16_graph_runs_and_matches(unet3d_onnx):
    path, tiles = unet3d_onnx
    model = onnx.load(str(path))
    low = to_low_precision(model, "fp16")
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert low.graph.input[0].type.tensor_type.elem_type == f32  # I/O stay fp32
    assert low.graph.output[0].type.tensor_type.elem_type == f32
    conv_weights = {n.input[1] for n in low.graph.node if n.op_type == "Conv"}
    types = {i.name: i.data_type for i in low.graph.initializer}
    assert conv_weights and all(types[w] == f16 for w in conv_weights if w in types)
    # instance normalisation runs in fp32 (its scale/bias stay fp32, casts around it)
    norms = [n for n in low.graph.node if n.op_type == "InstanceNormalization"]
    assert norms and all(types.get(n.input[1], f32) == f32 for n in norms)
    x = tiles[0][np.newaxis]
    ref, out = _ort(model, x), _ort(low, x)
    assert metrics.pearson(out, ref) > 0.9999
    assert metrics.relative_l2(out, ref) < 5e-3


def test_fp16_keeps_shape_arithmetic_in_fp32():
    """A size computed in float (here 3001 × 1.5 → 4501; fp16 has no 3001 nor 4501) must survive the cast."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["sf", "k"], ["m"]),
        helper.make_node("Cast", ["m"], ["n"], to=TensorProto.INT64),
        helper.make_node("Mul", ["x", "w"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3001])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3001]),
            helper.make_tensor_value_info("n", TensorProto.INT64, [1]),
        ],
        [
            numpy_helper.from_array(np.array([1.5], np.float32), "k"),
            numpy_helper.from_array(np.array([0.5], np.float32), "w"),
        ],
    )
    low = to_low_precision(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "fp16")
    x = np.linspace(-1, 1, 3001, dtype=np.float32)
    s = ort.InferenceSession(low.SerializeToString(), providers=["CPUExecutionProvider"])
    y, n = s.run(None, {"x": x})
    assert n.tolist() == [4501]
    assert np.allclose(y, 0.5 * x, atol=1e-3)
    assert {i.name: i.data_type for i in low.graph.initializer}["w"] == TensorProto.FLOAT16


def test_bf16_graph_is_valid_onnx(unet3d_onnx):
    """bf16 convolutions exist from opset 22 on; ONNX Runtime has no CPU kernels for them, so the graph is
    checked with the full ONNX checker (types, shapes) rather than run."""
    model = to_low_precision(onnx.load(str(unet3d_onnx[0])), "bf16")
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 22
    assert onnx.TensorProto.BFLOAT16 in {i.data_type for i in model.graph.initializer}


def test_int8_qdq_graph_is_symmetric_signed_and_close(unet3d_onnx):
    path, tiles = unet3d_onnx
    model = onnx.load(str(path))
    q = quantize_qdq(model, tiles[:6])
    from onnx import numpy_helper

    inits = {i.name: i for i in q.graph.initializer}
    qnodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert qnodes
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[n.input[2]]
            assert zp.data_type == onnx.TensorProto.INT8  # TensorRT: signed int8 only
            assert not np.any(numpy_helper.to_array(zp))  # and zero point 0
    x = tiles[7][np.newaxis]  # not a calibration tile
    ref, out = _ort(model, x), _ort(q, x)
    assert metrics.pearson(out, ref) > 0.99


def test_fp8_graph_runs_in_onnxruntime(unet3d_onnx):
    path, tiles = unet3d_onnx
    model = onnx.load(str(path))
    fp8 = int8_to_fp8(quantize_qdq(model, tiles[:6]))
    zps = {n.input[2] for n in fp8.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    types = {i.name: i.data_type for i in fp8.graph.initializer}
    assert zps and all(types[z] == onnx.TensorProto.FLOAT8E4M3FN for z in zps)
    x = tiles[7][np.newaxis]
    r = metrics.pearson(_ort(fp8, x), _ort(model, x))
    assert 0.97 < r < 1.0  # E4M3 keeps 3 mantissa bits: close, but not identical


def test_unsigned_quantizers_become_signed():
    """uint8 (zero point 0) Q/DQ covering [0, 255 s] becomes int8 with scale 255 s / 127: same range."""
    from onnx import TensorProto, helper, numpy_helper

    scale = numpy_helper.from_array(np.array(0.01, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.uint8), "z")
    g = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [scale, zp],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([0.0, 0.5, 1.0, 2.55], np.float32)
    before = _ort(m, x)
    assert signed_int8(m) == 1
    after = _ort(m, x)
    assert {i.name: i.data_type for i in m.graph.initializer}["z"] == TensorProto.INT8
    assert after.max() == pytest.approx(before.max(), rel=1e-6)  # the top of the range is kept
    assert np.abs(after - x).max() <= 0.01 * 255 / 127 / 2 + 1e-6


# ------------------------------------------------------------------------------------ profiles


@pytest.mark.parametrize(
    ("tile", "tmin", "step", "batch", "expected"),
    [
        (
            (32, 128, 128),
            (16, 16, 16),
            (16, 16, 16),
            1,
            ((1, 1, 16, 64, 64), (1, 1, 32, 128, 128), (8, 1, 64, 256, 256)),
        ),
        ((256, 256), None, None, 2, ((1, 1, 128, 128), (2, 1, 256, 256), (8, 1, 512, 512))),
        ((24, 40), (8, 8), (16, 16), 1, ((1, 1, 24, 24), (1, 1, 24, 40), (8, 1, 40, 72))),
        ((17,), (17,), (4,), 12, ((1, 1, 17), (12, 1, 17), (12, 1, 33))),
    ],
)
def test_profile_shapes(tile, tmin, step, batch, expected):
    p = profile_shapes(tile, 1, tmin, step, batch_size=batch, max_batch_size=8)
    assert (p["min"], p["opt"], p["max"]) == expected
    assert profile_covers(p, p["opt"]) and not profile_covers(p, (expected[2][0] + 1, *expected[2][1:]))


def test_profile_rejects_invalid_tile():
    with pytest.raises(ConfigError, match="not a shape this network accepts"):
        profile_shapes((30, 128, 128), 1, (16, 16, 16), (16, 16, 16))


def test_plan_key_and_precision_support():
    from efficientbioai.engines.tensorrt import check_precision_supported, plan_key

    h200 = {"name": "NVIDIA H200", "compute_capability": "9.0"}
    rtx4000 = {"name": "Quadro RTX 4000", "compute_capability": "7.5"}
    assert plan_key(h200, "11.4.0.106") == "nvidia-h200-sm90-trt11.4.0.106"
    check_precision_supported("fp8", h200)
    with pytest.raises(EfficientBioAIError, match="compute capability ≥ 8.9"):
        check_precision_supported("fp8", rtx4000)
    with pytest.raises(EfficientBioAIError, match="compute capability ≥ 8.0"):
        check_precision_supported("bf16", rtx4000)


def test_plan_reuse_rebuild_and_cache(tmp_path, monkeypatch, capsys):
    """Which plan infer uses. Stand-ins (no GPU / TensorRT on the machines CI runs on): the GPU query,
    the TensorRT version and the builder are replaced; the decision logic and the files are real."""
    import efficientbioai.engines.tensorrt as trt_mod

    builds = []
    monkeypatch.setattr(trt_mod, "require_cuda", lambda *a, **k: None)
    monkeypatch.setattr(trt_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(
        trt_mod, "gpu_description", lambda index=0: {"name": "NVIDIA H200", "compute_capability": "9.0"}
    )
    monkeypatch.setattr(trt_mod, "tensorrt_version", lambda: "11.4.0.106")
    monkeypatch.setattr(
        trt_mod, "build_plan", lambda path, profile, **k: builds.append((path.name, profile)) or b"new"
    )
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "model.int8.onnx").write_bytes(b"onnx")
    (tmp_path / "tensorrt" / "model.plan").write_bytes(b"old")
    profile = profile_shapes((32, 64, 64), 1, batch_size=2, max_batch_size=8)
    here = trt_mod.plan_key({"name": "NVIDIA H200", "compute_capability": "9.0"}, "11.4.0.106")
    entry = {
        "precision": "int8",
        "onnx": "tensorrt/model.int8.onnx",
        "plan": "tensorrt/model.plan",
        "built_for": {
            "gpu": "NVIDIA H100",
            "tensorrt": "11.4.0.106",
            "key": "nvidia-h100-sm90-trt11.4.0.106",
        },
        "profile": {k: list(v) for k, v in profile.items()},
    }
    # built for another GPU: rebuilt from the ONNX, saying why, and cached
    plan, info = trt_mod.load_plan(tmp_path, entry, profile)
    assert plan == b"new" and info["source"] == "built" and builds == [("model.int8.onnx", profile)]
    assert "built for NVIDIA H100" in capsys.readouterr().err
    assert (tmp_path / info["plan"]).read_bytes() == b"new"
    # the next run finds the cached rebuild
    plan, info = trt_mod.load_plan(tmp_path, entry, profile)
    assert info["source"] == "cache" and len(builds) == 1
    # the artifact's own plan when it was built here and covers the tiles
    entry["built_for"] = {"gpu": "NVIDIA H200", "tensorrt": "11.4.0.106", "key": here}
    plan, info = trt_mod.load_plan(tmp_path, entry, profile)
    assert plan == b"old" and info["source"] == "artifact"
    # and for other tiles within its shapes (up to twice the tile), but not beyond
    assert trt_mod.load_plan(tmp_path, entry, profile_shapes((64, 128, 128), 1))[1]["source"] == "artifact"
    assert trt_mod.load_plan(tmp_path, entry, profile_shapes((96, 160, 160), 1))[1]["source"] == "built"
    # compressed without a GPU (no plan) and no ONNX left: a clear error
    (tmp_path / "tensorrt" / "model.int8.onnx").unlink()
    with pytest.raises(EfficientBioAIError, match="no TensorRT ONNX"):
        trt_mod.load_plan(tmp_path, {**entry, "plan": None}, profile_shapes((16, 32, 32), 1))
    # fp8 on a GPU without FP8 tensor cores
    monkeypatch.setattr(
        trt_mod, "gpu_description", lambda index=0: {"name": "RTX 3090", "compute_capability": "8.6"}
    )
    with pytest.raises(EfficientBioAIError, match="fp8 needs"):
        trt_mod.load_plan(tmp_path, {**entry, "precision": "fp8"}, profile)


# --------------------------------------------------------------------------------- config wiring


def _compress_cfg(
    tmp_path: Path, images: Path, targets=("openvino", "tensorrt"), precision="int8", **export
) -> CompressConfig:
    ckpt = tmp_path / "unet3d.pt"
    torch.save(tiny_unet(3).state_dict(), ckpt)
    return validate_config(
        {
            "model": {
                "kind": "monai",
                "name": "UNet",
                "kwargs": TINY_UNET_KWARGS,
                "checkpoint": str(ckpt),
                "axes": "bczyx",
            },
            "calibration": {"images": str(images), "num_tiles": 6, "tile_shape": [16, 32, 32]},
            "fidelity": {"num_tiles": 2},
            "engine": {"latency_repeats": 1, "threads": 1},
            "quantize": {"precision": precision},
            "export": {"targets": list(targets), **export},
            "output": str(tmp_path / "artifact"),
        }
    )


def test_config_accepts_gpu_targets_and_backends(tmp_path, images3d):
    cfg = _compress_cfg(tmp_path, images3d, tensorrt={"precision": "fp8", "max_batch_size": 4})
    assert "tensorrt" in cfg.export.targets and cfg.export.tensorrt.precision == "fp8"
    with pytest.raises(ConfigError, match="precision"):
        _compress_cfg(tmp_path, images3d, tensorrt={"precision": "int4"})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.yaml").write_text("manifest_version: 1\n")
    for backend in ("tensorrt", "torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt"):
        icfg = InferConfig.model_validate(
            {"model": str(tmp_path / "a"), "input": "x.tif", "output": "o", "backend": backend}
        )
        assert icfg.backend == backend and icfg.gpu.torch_precision == "fp16"


@pytest.fixture(scope="module")
def trt_artifact(tmp_path_factory) -> Path:
    """compress with export.targets [onnx, tensorrt] and an int8 TensorRT graph (on this machine)."""
    root = tmp_path_factory.mktemp("trt_artifact")
    (root / "calib").mkdir()
    for i in range(2):
        tifffile.imwrite(root / "calib" / f"v{i}.tif", blobs((24, 64, 64), n=8, seed=i)[0])
    # fp32 ONNX Runtime as the CPU engine: no OpenVINO needed, so this also runs on GPU images without it
    cfg = _compress_cfg(root, root / "calib", ("onnx", "tensorrt"), "fp32", tensorrt={"precision": "int8"})
    compress(cfg, quiet=True)
    return root / "artifact"


def test_compress_writes_tensorrt_graph_and_records_it(trt_artifact):
    m = yaml.safe_load((trt_artifact / "manifest.yaml").read_text())
    t = m["engines"]["tensorrt"]
    assert t["precision"] == "int8" and t["onnx"] == "tensorrt/model.int8.onnx"
    assert t["onnx"] in m["files"]  # checksummed like every artifact file
    assert (trt_artifact / t["onnx"]).is_file()
    assert t["preparation"]["tool"].startswith("nncf") and t["preparation"]["quantizers"] > 0
    # checked on the CPU against the original on the held-out tiles
    assert t["cpu_check"]["tiles"] == 2 and t["cpu_check"]["pearson"] > 0.99
    if not HAS_GPU:
        assert t["plan"] is None and t["built_for"] is None
        assert t["plan_status"].startswith("built on first use on a GPU machine")
    else:  # pragma: no cover - GPU machines
        assert (t["plan"] is not None) == HAS_TRT
    assert m["engines"]["primary"]["backend"] == "onnxruntime"  # the CPU engine stays the primary one


@no_gpu_here
def test_infer_tensorrt_without_gpu_says_what_is_missing(trt_artifact, tmp_path):
    """The real CLI in a subprocess: backend tensorrt on a machine without an NVIDIA GPU."""
    img = tmp_path / "vol.tif"
    tifffile.imwrite(img, blobs((24, 64, 64), seed=5)[0])
    cfg = {"model": str(trt_artifact), "input": str(img), "output": str(tmp_path / "out"), "energy": False}
    for backend in ("tensorrt", "torch-cuda"):
        path = tmp_path / f"{backend}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "backend": backend}))
        r = run_cli("infer", "--config", str(path), cwd=tmp_path)
        assert r.returncode != 0
        assert "needs an NVIDIA GPU with CUDA" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "vol.tif").exists()  # nothing half-written


@no_gpu_here
def test_infer_default_backend_without_gpu_is_the_cpu_engine(trt_artifact, tmp_path, capsys):
    from efficientbioai.artifact import read_manifest
    from efficientbioai.infer import infer
    from efficientbioai.infer.gpu import choose_backend

    backend, why = choose_backend(read_manifest(trt_artifact), None)
    assert backend == "onnxruntime" and "no NVIDIA GPU" in why
    img = tmp_path / "vol.tif"
    tifffile.imwrite(img, blobs((24, 64, 64), seed=5)[0])
    cfg = InferConfig.model_validate(
        {"model": str(trt_artifact), "input": str(img), "output": str(tmp_path / "out"), "energy": False}
    )
    res = infer(cfg)
    assert "onnxruntime (no NVIDIA GPU here" in capsys.readouterr().err  # infer says what it picked
    assert res.images[0].runs[0].engine == "onnxruntime fp32"


def test_default_backend_with_a_gpu(monkeypatch):
    """The choice infer makes on a GPU machine (stand-in: the GPU and TensorRT checks are replaced)."""
    import efficientbioai.compress.tensorrt as ct
    import efficientbioai.engines.cuda as cuda
    from efficientbioai.infer.gpu import choose_backend

    monkeypatch.setattr(cuda, "cuda_available", lambda: True)
    torch_original = manifest_stub(
        engines={
            "onnx": {"backend": "onnxruntime", "precision": "fp32", "path": "model.onnx"},
            "primary": {"backend": "openvino", "precision": "int8"},
            "tensorrt": {"precision": "int8"},
        },
        model={"name": "unet", "config": {"kind": "monai"}},
        latency={"original": {"backend": "torch"}},
    )
    monkeypatch.setattr(ct, "gpu_status", lambda: (True, ""))
    assert choose_backend(torch_original, None)[0] == "tensorrt"
    assert choose_backend(torch_original, "openvino") == ("openvino", "backend set in the config")
    monkeypatch.setattr(ct, "gpu_status", lambda: (False, "the tensorrt package is not installed"))
    backend, why = choose_backend(torch_original, None)
    assert backend == "torch-cuda" and "tensorrt package is not installed" in why
    onnx_original = torch_original.model_copy(update={"latency": {"original": {"backend": "onnxruntime"}}})
    assert choose_backend(onnx_original, None)[0] == "openvino"  # nothing to run on the GPU


def test_onnxruntime_gpu_providers_missing_is_a_clear_error():
    from efficientbioai.engines.onnxruntime import select_providers

    assert select_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers(
        "tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    ) == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(EfficientBioAIError, match="onnxruntime-gpu"):
        select_providers("cuda", ["CPUExecutionProvider"])


@no_gpu_here
def test_gpu_status_without_gpu():
    ok, why = gpu_status()
    assert not ok and "no NVIDIA GPU" in why


# ---------------------------------------------------------------------------------- NVML energy


def test_nvml_energy_is_labelled_and_synchronised(monkeypatch):
    """Stand-in for nvidia-ml-py's pynvml (no NVIDIA GPU exists on the machines CI runs on): the GPU
    part is the counter's difference, labelled "measured (NVML)", and the synchronisation callback runs
    before the counter is read the second time."""
    from efficientbioai.energy import EnergyMeter, format_energy

    from .test_energy import _fake_pynvml

    calls: list[str] = []
    fake = _fake_pynvml([1_000_000, 1_000_000, 1_012_500], calls)  # probe, before, after (mJ)
    read = fake.nvmlDeviceGetTotalEnergyConsumption

    def energy(handle):
        calls.append("energy")
        return read(handle)

    fake.nvmlDeviceGetTotalEnergyConsumption = energy
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    def sync():
        calls.append("synchronize")

    with EnergyMeter(gpu_index=0) as meter, meter.measure(synchronize=sync) as m:
        pass
    r = m.reading
    assert r.details["gpu_joules"] == pytest.approx(12.5)
    assert "measured (NVML)" in format_energy(r) and "GPU 12.5 J" in format_energy(r)
    reads = [i for i, c in enumerate(calls) if c == "energy"]
    assert calls.index("synchronize") < reads[-1]


# ------------------------------------------------------------------------------ on a GPU only


@needs_gpu
def test_torch_cuda_engine_matches_cpu():  # pragma: no cover - GPU machines
    from efficientbioai.engines import TorchEngine
    from efficientbioai.engines.cuda import TorchCudaEngine

    net = tiny_unet(3)
    x = np.stack([blobs((16, 32, 32), seed=s)[0][np.newaxis] for s in range(3)])
    ref = TorchEngine(net, 1)(x)
    fp32 = TorchCudaEngine(tiny_unet(3), "fp32", channels_last=False)
    assert np.allclose(fp32(x), ref, atol=1e-3)
    fp16 = TorchCudaEngine(tiny_unet(3), "fp16")
    outs = list(fp16.map([x[i : i + 1] for i in range(3)]))  # pipelined: same order, same values
    assert metrics.pearson(np.concatenate(outs), ref) > 0.999


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_tensorrt_engine_matches_original(trt_artifact, tmp_path, precision):  # pragma: no cover - GPU
    from efficientbioai.compress.trt_graph import prepare_onnx
    from efficientbioai.engines.cuda import gpu_description
    from efficientbioai.engines.tensorrt import FP8_MIN_CAPABILITY, TensorRTEngine, build_plan

    cc = tuple(int(v) for v in gpu_description()["compute_capability"].split("."))
    if precision == "fp8" and cc < FP8_MIN_CAPABILITY:
        pytest.skip(f"fp8 needs compute capability ≥ 8.9; this GPU has {cc}")
    tiles = [blobs((16, 32, 32), n=4, seed=s)[0][np.newaxis] for s in range(8)]
    path, _ = prepare_onnx(trt_artifact / "model.onnx", precision, tmp_path, tiles[:6])
    profile = profile_shapes((16, 32, 32), 1, None, None, 2, 4)
    with TensorRTEngine(build_plan(path, profile), precision) as engine:
        x = np.stack(tiles[6:])
        out = engine(x)
        assert np.allclose(np.concatenate(list(engine.map([x[:1], x[1:]]))), out, atol=1e-5)
    ref = _ort(onnx.load(str(trt_artifact / "model.onnx")), x)
    assert metrics.pearson(out, ref) > {"fp16": 0.9999, "int8": 0.99, "fp8": 0.97}[precision]


@needs_tensorrt
def test_infer_tensorrt_builds_plan_on_first_use(trt_artifact, tmp_path):  # pragma: no cover - GPU
    from efficientbioai.infer import infer

    img = tmp_path / "vol.tif"
    tifffile.imwrite(img, blobs((24, 64, 64), seed=5)[0])
    cfg = InferConfig.model_validate(
        {
            "model": str(trt_artifact),
            "input": str(img),
            "output": str(tmp_path / "out"),
            "backend": "tensorrt",
            "compare_with_original": True,
        }
    )
    res = infer(cfg, quiet=True)
    assert res.images[0].runs[0].engine == "tensorrt int8"
    assert res.images[0].agreement["pearson"] > 0.99
    assert (
        any((trt_artifact / "tensorrt" / "plans").glob("*.plan"))
        or (trt_artifact / "tensorrt" / "model.plan").is_file()
    )


def test_the_gpu_check_answers_without_torch_where_no_driver_exists():
    """On a Linux machine with no NVIDIA driver, infer's default-backend check must not import torch (one
    to two seconds of every run); where a driver may exist the answer is torch's. Runs in a fresh process,
    since this test module has imported torch."""
    import subprocess

    from efficientbioai.engines.cuda import no_nvidia_driver

    code = (
        "import sys; from efficientbioai.engines.cuda import cuda_available; "
        "print(cuda_available(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    answer, imported = out.stdout.split()
    assert answer == str(HAS_GPU)
    assert imported == str(not no_nvidia_driver())  # torch imported only where a driver may exist
