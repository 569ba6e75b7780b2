"""What the benchmark ran on: CPU model and the instruction sets that decide int8 / bf16 speed, threads,
memory, GPU, package versions, and how busy the machine was."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from importlib import metadata
from pathlib import Path
from typing import Any

from efficientbioai.cpu import cpu_flags, describe_cap, read_cpuinfo

PACKAGES = (
    "efficientbioai",
    "torch",
    "openvino",
    "nncf",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "torch-pruning",
    "numpy",
    "monai",
    "codecarbon",
    "pillow",
    "cellpose",
)


def cpu_info() -> dict[str, Any]:
    model, raw = read_cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        usable = os.cpu_count() or 1
    return {
        "model": model,
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        # what the runtimes may use: the CPU's flags under OV_CPU_MAX_ISA / ONEDNN_MAX_CPU_ISA, if set
        "flags": cpu_flags(raw),
        "isa_cap": describe_cap(),
        "openvino_capabilities": openvino_capabilities(),
    }


def openvino_capabilities() -> list[str]:
    """OpenVINO's view of the CPU: which precisions it optimises for (e.g. FP32, BF16, INT8)."""
    try:
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return [str(c) for c in caps]
    except Exception:
        return []


def memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def gpu_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return {"available": False, "devices": [], "note": "torch is not installed"}
    if not torch.cuda.is_available():
        return {
            "available": False,
            "devices": [],
            "note": "no CUDA device (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'})",
        }
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": p.name,
                "memory_bytes": int(p.total_memory),
                "compute_capability": f"{p.major}.{p.minor}",
            }
        )
    return {"available": True, "devices": devices, "cuda": torch.version.cuda, "note": None}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def probe(threads: int) -> dict[str, Any]:
    """Everything a reader needs to compare this report with another machine's."""
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "memory_bytes": memory_bytes(),
        "threads": threads,
        "gpu": gpu_info(),
        "versions": versions(),
        "load_average_at_start": load,
    }


def flag_summary(cpu: dict[str, Any]) -> str:
    names = [name for name, on in cpu.get("flags", {}).items() if on]
    return ", ".join(names) if names else "no SIMD extensions of note"


# --------------------------------------------------------------------------------------- machine load


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
