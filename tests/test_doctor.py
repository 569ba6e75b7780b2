"""``efficientbioai doctor``: a real subprocess on this machine, checked against /proc/cpuinfo and /proc/meminfo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from efficientbioai.doctor import (
    config_needs,
    cpu_advice,
    diagnose,
    gpu_report,
    has_gpu,
    library_versions,
    rapl_status,
)

from .conftest import run_cli
from .manifests import write_manifest_stub

CPUINFO = Path("/proc/cpuinfo")


# what an ISA cap (OV_CPU_MAX_ISA / ONEDNN_MAX_CPU_ISA, as the AVX2 pass of .ci/run sets) takes away, written
# out here independently of efficientbioai.cpu
_CAP_REMOVES = {
    "AVX2": {"avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16"},
    "AVX512_CORE": {"avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16"},
    "AVX512_CORE_VNNI": {"avx_vnni", "avx512_bf16", "avx512_fp16"},
}
_AMX = {"amx_tile", "amx_int8", "amx_bf16", "amx_fp16"}


def _proc_flags() -> set[str]:
    """The CPU's flags as the runtimes may use them: /proc/cpuinfo less what an ISA cap removes."""
    flags: set[str] = set()
    for line in CPUINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    for var in ("OV_CPU_MAX_ISA", "ONEDNN_MAX_CPU_ISA"):
        cap = os.environ.get(var, "").strip().upper()
        if cap:
            assert cap in _CAP_REMOVES, f"{var}={cap}: add what it removes to _CAP_REMOVES"
            flags -= _CAP_REMOVES[cap] | _AMX
    return flags


def _proc_model() -> str | None:
    for line in CPUINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


needs_proc = pytest.mark.skipif(not CPUINFO.is_file(), reason="no /proc/cpuinfo (not Linux)")


@needs_proc
def test_doctor_prints_this_machine(tmp_path):
    res = run_cli("doctor", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr  # every core library is installed here
    out = res.stdout
    for section in ("Libraries", "CPU", "GPU", "Energy", "Memory and disk", "What this means"):
        assert f"\n{section}" in out
    import torch

    assert f"torch            {torch.__version__}" in out
    model = _proc_model()
    if model:
        assert model in out
    flags = _proc_flags()
    instructions = next(line for line in out.splitlines() if line.strip().startswith("instructions"))
    for flag, name in (
        ("avx512f", "AVX-512"),
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx512_bf16", "AVX-512 BF16"),
    ):
        assert (f" {name}," in instructions + ",") == (flag in flags), (flag, instructions)
    # the plain-words consequences follow the flags
    if "amx_int8" in flags:
        assert "AMX-INT8" in out
    elif "avx512_vnni" in flags:
        assert "int8 will use AVX-512 VNNI" in out
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert "bf16: native" in out
    else:
        assert "bf16: emulated" in out and "prefer int8" in out
    assert ("no AMX" in out) == ("amx_tile" not in flags)
    # energy: this machine's RAPL counters decide measured vs estimated
    rapl = rapl_status()
    assert ("CPU              measured" in out) == bool(rapl["readable"])


@needs_proc
def test_doctor_json_matches_proc(tmp_path):
    res = run_cli("doctor", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    flags = _proc_flags()
    cpu_flags = d["cpu"]["flags"]
    for flag, name in (
        ("avx512f", "AVX-512"),
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx_vnni", "AVX-VNNI"),
        ("avx512_bf16", "AVX-512 BF16"),
        ("amx_tile", "AMX"),
        ("amx_int8", "AMX-INT8"),
        ("amx_bf16", "AMX-BF16"),
    ):
        assert cpu_flags[name] == (flag in flags), flag
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert d["resources"]["memory_total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert d["resources"]["disk_free_bytes"] > 0
    assert d["libraries"]["openvino"]["version"]
    assert d["ok"] is True and d["config"] is None
    # the GPU section agrees with torch in this process
    import torch

    assert d["gpu"]["torch_cuda"]["available"] == torch.cuda.is_available()


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_config_needing_tensorrt_fails_without_a_gpu(tmp_path):
    cfg = _write(
        tmp_path,
        "trt.yaml",
        {"model": {"kind": "monai", "name": "UNet"}, "export": {"targets": ["tensorrt"]}, "output": "runs/x"},
    )
    gpu = gpu_report()
    can = has_gpu(gpu) and library_versions()["tensorrt"]["version"] is not None
    res = run_cli("doctor", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == (0 if can else 1), res.stdout
    if not can:
        assert "this config cannot run here" in res.stdout
        if not has_gpu(gpu):  # this project's CPU machines
            assert "MISSING NVIDIA GPU" in res.stdout
            assert "needed by export.targets tensorrt" in res.stdout
        assert "pip install tensorrt-cu12" in res.stdout or has_gpu(gpu)


def test_config_with_a_parser_that_is_not_importable_fails(tmp_path):
    cfg = _write(
        tmp_path,
        "mine.yaml",
        {"model": {"kind": "no_such_lab_package.parsers:MyParser", "axes": "bcyx"}, "output": "runs/x"},
    )
    res = run_cli("doctor", "--config", str(cfg), "--json", cwd=tmp_path)
    assert res.returncode == 1
    d = json.loads(res.stdout)
    assert d["ok"] is False and d["config"]["kind"] == "compress"
    missing = [n for n in d["needs"] if not n["ok"]]
    assert [n["what"] for n in missing] == ["python module 'no_such_lab_package.parsers'"]
    assert "PYTHONPATH" in missing[0]["fix"]


def test_config_that_can_run_passes(tmp_path):
    cfg = _write(
        tmp_path,
        "ok.yaml",
        {
            "model": {"kind": "monai", "name": "UNet"},
            "prune": {"ratio": 0.5},
            "quantize": {"precision": "int8"},
            "output": "runs/x",
        },
    )
    res = run_cli("doctor", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stdout
    assert "everything this config needs is here" in res.stdout
    assert "torch-pruning" in res.stdout


def test_infer_config_needs(tmp_path):
    artifact = tmp_path / "art"
    write_manifest_stub(artifact, model={"name": "nuclei", "kind": "cellpose"})
    cfg = _write(
        tmp_path,
        "infer.yaml",
        {"model": str(artifact), "input": "x.zarr", "output": "out", "distributed": {"scheduler": "slurm"}},
    )
    libs = library_versions()
    kind, needs = config_needs(cfg, libs, gpu_report())
    assert kind == "infer"
    whats = {n.what: n for n in needs}
    assert {"cellpose", "dask", "dask-jobqueue"} <= set(whats)
    # the same config on an installation without Dask: named, with the command that installs it
    no_dask = {k: ({**v, "version": None} if k in ("dask", "dask-jobqueue") else v) for k, v in libs.items()}
    monkey_needs = config_needs(cfg, no_dask, gpu_report())[1]
    dask_need = next(n for n in monkey_needs if n.what == "dask")
    if __import__("importlib").util.find_spec("distributed") is None:
        assert not dask_need.ok
    assert "dask[distributed]" in dask_need.fix
    # a missing artifact is named
    cfg2 = _write(tmp_path, "infer2.yaml", {"model": str(tmp_path / "nope"), "input": "x", "output": "o"})
    needs2 = config_needs(cfg2, libs, gpu_report())[1]
    assert any(not n.ok and "nope" in n.what for n in needs2)
    # an artifact written by another version (no manifest checksum beside it) is named, with the fix
    (artifact / "manifest.sha256").unlink()
    (artifact / "manifest.yaml").write_text(yaml.safe_dump({"manifest_version": 1, "model": {"kind": "cellpose"}}))
    old = [n for n in config_needs(cfg, libs, gpu_report())[1] if not n.ok and "art" in n.what]
    assert old and "not written by this version" in old[0].why and "re-run `efficientbioai compress`" in old[0].fix


@pytest.mark.parametrize(
    ("flags", "expect", "absent"),
    [
        (
            {"AVX2": True, "AVX-512": True, "AVX-512 VNNI": True, "AVX-512 BF16": False, "AMX": False},
            ["int8 will use AVX-512 VNNI", "bf16: emulated", "prefer int8", "no AMX"],
            ["AMX tiles"],
        ),
        (
            {"AVX2": True, "AVX-512 VNNI": True, "AMX": True, "AMX-INT8": True, "AMX-BF16": True},
            ["AMX-INT8", "AMX-BF16", "AMX: present"],
            ["emulated"],
        ),
        ({"AVX2": True, "AVX-VNNI": True}, ["AVX-VNNI (256-bit)", "bf16: emulated"], ["AVX-512 VNNI"]),
        ({"AVX2": True}, ["no VNNI"], []),
    ],
)
def test_cpu_advice(flags, expect, absent):
    text = "\n".join(cpu_advice(flags, "x86_64"))
    for e in expect:
        assert e in text
    for a in absent:
        assert a not in text


def test_rapl_status(tmp_path):
    assert rapl_status(tmp_path) == {"zones": [], "readable": []}
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("123456\n")
    assert rapl_status(tmp_path) == {"zones": ["intel-rapl:0"], "readable": ["intel-rapl:0"]}


def test_diagnose_in_process_matches_cli_sections():
    report = diagnose()
    text = report.text()
    assert report.ok
    assert "What this means" in text
    if CPUINFO.is_file():
        assert report.cpu["flags"]["AVX-512"] == ("avx512f" in _proc_flags())
