"""The CPU's instruction sets as the runtimes may use them, and int8 that gives one answer on every x86 CPU.

The project's machines change CPU kind between sessions (AVX2-only, AVX-512 VNNI, AMX). OpenVINO can be
capped to a lower ISA (``OV_CPU_MAX_ISA`` with ``ONEDNN_MAX_CPU_ISA``): the tests below use that cap to run
the AVX2 code path on whatever CPU this is, with the real OpenVINO engine in a subprocess.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from efficientbioai.artifact import warn_if_int8_saturates
from efficientbioai.cpu import cpu_flags, describe_cap, int8_dot_product, int8_saturates, isa_cap

from .conftest import run_cli
from .manifests import manifest_stub

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_x86 = pytest.mark.skipif(not X86, reason="the ISA cap and int8 saturation are x86 matters")
AVX2_CAP = {"OV_CPU_MAX_ISA": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

ZEN4 = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}
SPR = ZEN4 | {"avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}


@pytest.mark.parametrize(
    ("raw", "cap", "present", "absent"),
    [
        (ZEN4, {}, {"AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16"}, {"AMX"}),
        (ZEN4, AVX2_CAP, {"AVX2", "FMA"}, {"AVX-512", "AVX-512 VNNI", "AVX-512 BF16"}),
        (ZEN4, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, {"AVX-512"}, {"AVX-512 VNNI", "AVX-512 BF16"}),
        (ZEN4, {"OV_CPU_MAX_ISA": "AVX512_CORE_VNNI"}, {"AVX-512 VNNI"}, {"AVX-512 BF16"}),
        (SPR, {"OV_CPU_MAX_ISA": "AVX512_CORE_BF16"}, {"AVX-512 BF16"}, {"AMX", "AMX-INT8", "AVX-VNNI"}),
        (SPR, {"OV_CPU_MAX_ISA": "AVX512_CORE_AMX"}, {"AMX", "AMX-INT8", "AMX-BF16"}, set()),
        # the tightest of the two variables wins; an unknown name is ignored, as the runtimes do
        (SPR, {"OV_CPU_MAX_ISA": "AVX512_CORE_AMX", "ONEDNN_MAX_CPU_ISA": "AVX2"}, {"AVX2"}, {"AMX"}),
        (ZEN4, {"OV_CPU_MAX_ISA": "NO_SUCH_ISA"}, {"AVX-512 VNNI"}, set()),
        # a cap never adds what the CPU lacks
        ({"avx2", "fma"}, {"OV_CPU_MAX_ISA": "AVX512_CORE_AMX"}, {"AVX2"}, {"AVX-512", "AMX"}),
    ],
)
def test_cpu_flags_under_an_isa_cap(raw, cap, present, absent):
    flags = cpu_flags(raw, cap)
    assert all(flags[n] for n in present), flags
    assert not any(flags[n] for n in absent), flags


@pytest.mark.parametrize(
    ("raw", "expect"),
    [(SPR, "AMX-INT8"), (ZEN4, "AVX-512 VNNI"), ({"avx2", "avx_vnni"}, "AVX-VNNI"), ({"avx2", "avx512f"}, None)],
)
def test_int8_dot_product(raw, expect):
    assert int8_dot_product(cpu_flags(raw, {})) == expect
    assert int8_saturates(cpu_flags(raw, {}), "x86_64") == (expect is None)
    assert not int8_saturates(cpu_flags(raw, {}), "aarch64")  # 16-bit saturation is an x86 matter


def test_the_cap_is_read_from_the_environment(monkeypatch):
    for var in AVX2_CAP:
        monkeypatch.delenv(var, raising=False)
    assert isa_cap() is None and describe_cap() is None
    monkeypatch.setenv("OV_CPU_MAX_ISA", " avx2 ")
    assert isa_cap() == {"OV_CPU_MAX_ISA": "AVX2"}
    assert describe_cap() == "OV_CPU_MAX_ISA=AVX2"
    assert not cpu_flags()["AVX-512"]


@needs_x86
def test_doctor_says_when_the_isa_is_capped(tmp_path, monkeypatch):
    for var, value in AVX2_CAP.items():
        monkeypatch.setenv(var, value)
    res = run_cli("doctor", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "ISA capped by    OV_CPU_MAX_ISA=AVX2, ONEDNN_MAX_CPU_ISA=AVX2" in out
    instructions = next(line for line in out.splitlines() if line.strip().startswith("instructions"))
    assert "AVX2" in instructions and "AVX-512" not in instructions
    assert "no VNNI" in out and "overflow_fix" in out
    # OpenVINO itself obeys the cap: no native bf16 under AVX2
    assert "BF16" not in next(line for line in out.splitlines() if "OpenVINO sees" in line)


def _int8_stub(fix: str | None):
    step = {"step": "quantize_int8", "tool": "nncf"}
    if fix is not None:
        step["overflow_fix"] = fix
    return manifest_stub(transformations=[step])


@needs_x86
@pytest.mark.parametrize(("fix", "warns"), [("first_layer", True), ("none", True), (None, True), ("all_layers", False)])
def test_infer_warns_where_the_artifact_saturates(monkeypatch, fix, warns):
    """Under the AVX2 cap this CPU has no VNNI: only artifacts without headroom in every layer warn."""
    for var, value in AVX2_CAP.items():
        monkeypatch.setenv(var, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_int8_saturates(_int8_stub(fix))
    messages = [str(w.message) for w in caught]
    assert bool(messages) == warns, messages
    if warns:
        assert "no VNNI" in messages[0] and "overflow_fix: all_layers" in messages[0]
        assert "OV_CPU_MAX_ISA=AVX2" in messages[0]


def test_no_warning_for_float_artifacts_or_on_vnni(monkeypatch):
    for var in AVX2_CAP:
        monkeypatch.setenv(var, "AVX2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_int8_saturates(manifest_stub(transformations=[]))  # no int8 step: nothing to say
    monkeypatch.setenv("OV_CPU_MAX_ISA", "AVX512_CORE_VNNI")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    if cpu_flags()["AVX-512 VNNI"]:  # this CPU has VNNI: a first_layer artifact is fine here
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_int8_saturates(_int8_stub("first_layer"))


class _Narrow(torch.nn.Module):
    """Wide enough that int8 sums of u8 × s8 pairs overflow 16 bits when weights use the full 8 bits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv3d(1, 32, 3, padding=1)
        self.b = torch.nn.Conv3d(32, 32, 3, padding=1)
        self.c = torch.nn.Conv3d(32, 1, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


_RUN = """
import json, sys, numpy as np, openvino as ov
x = np.load(sys.argv[2])
c = ov.Core().compile_model(sys.argv[1], "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
np.save(sys.argv[3], c(x)[c.output(0)])
ops = c.get_runtime_model().get_ordered_ops()
print(json.dumps([o.get_rt_info()["runtimePrecision"].astype(str) for o in ops
                  if o.get_rt_info()["layerType"].astype(str) == "Convolution"]))
"""


def _run_openvino(xml, x_path, out_path, env):
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, str(xml), str(x_path), str(out_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return np.load(out_path), json.loads(proc.stdout.strip().splitlines()[-1])


@needs_x86
def test_int8_with_headroom_gives_the_same_output_under_the_avx2_cap(tmp_path):
    """NNCF int8 with overflow_fix all_layers (the default): the AVX2 kernels (saturating 16-bit sums)
    give the output of this CPU's own kernels, and still run the convolutions in int8."""
    import openvino as ov

    from efficientbioai.compress.quantize import quantize_int8
    from efficientbioai.config import QuantizeConfig

    net = _Narrow().eval()
    rng = np.random.default_rng(0)
    tiles = [rng.random((1, 8, 24, 24), dtype=np.float32) * 4 for _ in range(6)]
    x = rng.random((1, 1, 8, 24, 24), dtype=np.float32) * 4
    np.save(tmp_path / "x.npy", x)
    ov_model = ov.convert_model(net, example_input=torch.from_numpy(x))
    q = quantize_int8(ov_model, tiles, QuantizeConfig(), quiet=True)
    ov.save_model(q, tmp_path / "q.xml")
    base = {k: v for k, v in os.environ.items() if k not in AVX2_CAP}
    native, _ = _run_openvino(tmp_path / "q.xml", tmp_path / "x.npy", tmp_path / "native.npy", base)
    capped, precisions = _run_openvino(
        tmp_path / "q.xml", tmp_path / "x.npy", tmp_path / "capped.npy", {**base, **AVX2_CAP}
    )
    assert any(p in ("u8", "i8") for p in precisions), precisions  # int8 kernels ran under the cap
    rel = np.linalg.norm(capped - native) / np.linalg.norm(native)
    assert rel < 1e-4, rel
