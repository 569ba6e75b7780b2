"""What this machine has: libraries and versions, CPU instructions, GPU, energy counters, memory and disk."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from efficientbioai.energy.sources import RAPL_ROOT as ENERGY_RAPL_ROOT

PIP_CORE = 'pip install torch==2.13.0 && pip install efficientbioai   # or pip install -e "." in a clone'


@dataclass(frozen=True)
class Library:
    """One library doctor reports: its distribution names (the first installed one counts) and its fix."""

    name: str
    distributions: tuple[str, ...]
    role: str
    install: str
    required: bool = False


LIBRARIES = (
    Library("torch", ("torch",), "PyTorch: original models, pruning, fine-tuning", PIP_CORE, True),
    Library(
        "openvino", ("openvino",), "CPU engine (int8 / bf16 / fp16 / fp32)", "pip install openvino", True
    ),
    Library("nncf", ("nncf",), "int8 post-training quantization", "pip install nncf", True),
    Library("onnx", ("onnx",), "ONNX export", "pip install onnx", True),
    Library(
        "onnxruntime",
        ("onnxruntime", "onnxruntime-gpu"),
        "portable engine, ONNX parity checks",
        "pip install onnxruntime",
        True,
    ),
    Library(
        "torch-pruning",
        ("torch-pruning",),
        "structured pruning",
        'pip install "torch-pruning>=1.5,<1.7"',
        True,
    ),
    Library("monai", ("monai",), "model.kind monai", "pip install monai", True),
    Library("codecarbon", ("codecarbon",), "energy (CPU + RAM)", "pip install codecarbon", True),
    Library("zarr", ("zarr",), "zarr / OME-Zarr images", "pip install zarr", True),
    Library(
        "cellpose",
        ("cellpose",),
        "model.kind cellpose (extra [cellpose])",
        'pip install "efficientbioai[cellpose]"   # cellpose 3.x',
    ),
    Library(
        "dask",
        ("distributed",),
        "infer `distributed:` (Dask scale-out)",
        'pip install "dask[distributed]"',
    ),
    Library(
        "dask-jobqueue",
        ("dask-jobqueue",),
        "Dask on SLURM / PBS / LSF clusters",
        "pip install dask-jobqueue",
    ),
    Library(
        "tensorrt",
        ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
        "NVIDIA GPU engine (needs a GPU)",
        "pip install tensorrt-cu12   # NVIDIA GPU with a CUDA 12 driver",
    ),
    Library(
        "nvidia-ml-py",
        ("nvidia-ml-py", "pynvml"),
        "GPU energy (NVML counters), GPU and driver names",
        "pip install nvidia-ml-py",
    ),
    Library(
        "bioimageio.spec",
        ("bioimageio.spec",),
        "export-bioimageio validation (extra [bioimageio])",
        'pip install "efficientbioai[bioimageio]"',
    ),
)


# import names of distributions whose presence is also checked by importing nothing but their spec
IMPORT_NAMES = {"dask": "distributed", "tensorrt": "tensorrt", "nvidia-ml-py": "pynvml"}


RAPL_GLOB = ("intel-rapl:*", "intel-rapl*")


RAPL_ROOT = Path(ENERGY_RAPL_ROOT)  # the folder the energy meter reads


RAPL_FIX = (
    "sudo chmod -R a+r /sys/class/powercap/intel-rapl   # make the RAPL counters readable (until reboot)"
)


def library_versions() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for lib in LIBRARIES:
        version = dist = None
        for d in lib.distributions:
            with contextlib.suppress(metadata.PackageNotFoundError):
                version, dist = metadata.version(d), d
                break
        out[lib.name] = {
            "version": version,
            "distribution": dist,
            "role": lib.role,
            "required": lib.required,
            "install": lib.install,
        }
    return out


def cpu_advice(flags: dict[str, bool], architecture: str) -> list[str]:
    """Plain-words consequences of the CPU's instruction sets for int8 / bf16 / fp16."""
    f = flags
    if architecture.lower() in ("aarch64", "arm64"):
        dot = f.get("NEON dot product")
        return [
            "ARM CPU: OpenVINO runs here, but its int8 and bf16 kernels are tuned for x86; measure before "
            "you choose (`efficientbioai benchmark`)",
            "int8: NEON dot-product instructions present"
            if dot
            else "int8: no NEON dot product: prefer fp32",
        ]
    lines = []
    if f.get("AMX-INT8"):
        lines.append("int8 will use AMX tiles (AMX-INT8): the fastest int8 path on CPUs, well above 4× fp32")
    elif f.get("AVX-512 VNNI"):
        lines.append(
            "int8 will use AVX-512 VNNI: expect int8 ≈ 4× fp32 convolution throughput (peak; thin layers get less)"
        )
    elif f.get("AVX-VNNI"):
        lines.append("int8 will use AVX-VNNI (256-bit): expect int8 ≈ 4× fp32 convolution throughput (peak)")
    elif f.get("AVX2"):
        lines.append(
            "int8: no VNNI dot-product instructions: int8 still runs, but usually gains less than 2× "
            "over fp32; try bf16/fp32 too. Its 16-bit sums saturate: artifacts compressed with "
            "quantize.overflow_fix: first_layer lose accuracy here (the default, all_layers, does not)"
        )
    else:
        lines.append("int8: no AVX2: OpenVINO's fast CPU kernels need at least AVX2; expect slow engines")
    if f.get("AMX-BF16"):
        lines.append("bf16: native AMX-BF16 tiles: bf16 is fast and keeps accuracy, an alternative to int8")
    elif f.get("AVX-512 BF16"):
        lines.append(
            "bf16: native AVX512-BF16 instructions: bf16 ≈ 2× fp32 peak with almost no accuracy loss"
        )
    else:
        lines.append("bf16: emulated (no AVX512-BF16 or AMX-BF16): prefer int8, or fp32")
    if f.get("AVX-512 FP16") or f.get("AMX-FP16"):
        lines.append("fp16: native fp16 arithmetic on this CPU")
    else:
        lines.append(
            "fp16: no native fp16 units: OpenVINO runs a fp16 request in bf16 (or fp32); the manifest says which"
        )
    lines.append("AMX: present" if f.get("AMX") else "no AMX (Intel Sapphire Rapids and later have it)")
    return lines


def gpu_report() -> dict[str, Any]:
    """GPUs from NVML (driver, names, memory, energy counter) and from torch.cuda (CUDA build)."""
    out: dict[str, Any] = {
        "devices": [],
        "driver": None,
        "cuda_driver": None,
        "nvml": None,
        "torch_cuda": None,
    }
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            out["nvml"] = "ok"
            out["driver"] = as_text(pynvml.nvmlSystemGetDriverVersion())
            with contextlib.suppress(Exception):
                v = pynvml.nvmlSystemGetCudaDriverVersion()
                out["cuda_driver"] = f"{v // 1000}.{(v % 1000) // 10}"
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                energy = True
                try:
                    pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
                except Exception:
                    energy = False
                out["devices"].append(
                    {
                        "index": i,
                        "name": as_text(pynvml.nvmlDeviceGetName(h)),
                        "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                        "energy_counter": energy,
                    }
                )
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
    except ImportError:
        out["nvml"] = "nvidia-ml-py not installed"
    except Exception as exc:  # no driver / no GPU: NVMLError_LibraryNotFound, DriverNotLoaded...
        out["nvml"] = f"no NVIDIA driver ({type(exc).__name__})"
    try:
        import torch

        out["torch_cuda"] = {
            "available": bool(torch.cuda.is_available()),
            "cuda_build": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else [],
        }
    except ImportError:
        pass
    return out


def as_text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def has_gpu(gpu: dict[str, Any]) -> bool:
    return bool(gpu["devices"]) or bool((gpu.get("torch_cuda") or {}).get("available"))


def rapl_status(root: Path = RAPL_ROOT) -> dict[str, Any]:
    """RAPL energy counters: present? readable by this user?"""
    zones = sorted({p for pattern in RAPL_GLOB for p in root.glob(pattern) if (p / "energy_uj").exists()})
    readable = []
    for z in zones:
        with contextlib.suppress(OSError):
            int((z / "energy_uj").read_text().strip())
            readable.append(z.name)
    return {"zones": [z.name for z in zones], "readable": readable}


def energy_report(libs: dict[str, dict[str, Any]], gpu: dict[str, Any]) -> dict[str, Any]:
    rapl = rapl_status()
    codecarbon = libs["codecarbon"]["version"] is not None
    if not codecarbon:
        cpu = "unavailable: CodeCarbon is not installed (pip install codecarbon)"
        cpu_method = "unavailable"
    elif rapl["readable"]:
        cpu, cpu_method = f"measured: RAPL counters readable ({', '.join(rapl['readable'])})", "measured"
    elif rapl["zones"]:
        cpu = "estimated: RAPL counters exist but this user cannot read them (CPU load × TDP instead)"
        cpu_method = "estimated"
    else:
        cpu = "estimated: no RAPL counters (a VM or a CPU without them): CPU load × TDP"
        cpu_method = "estimated"
    counters = [d for d in gpu["devices"] if d["energy_counter"]]
    if counters:
        gpu_text, gpu_method = f"measured: NVML energy counters on {len(counters)} GPU(s)", "measured"
    elif gpu["devices"]:
        gpu_text, gpu_method = (
            "unavailable: the GPU has no NVML energy counter (Volta or newer needed)",
            "unavailable",
        )
    else:
        gpu_text, gpu_method = f"no NVIDIA GPU seen by NVML ({gpu['nvml']})", "none"
    return {
        "cpu": cpu,
        "cpu_method": cpu_method,
        "ram": "estimated: CodeCarbon models DRAM power (no counter on x86)",
        "gpu": gpu_text,
        "gpu_method": gpu_method,
        "rapl": rapl,
    }


def memory_report(path: Path) -> dict[str, Any]:
    info = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                info[key] = int(value.split()[0]) * 1024
    disk = shutil.disk_usage(path)
    return {
        "memory_total_bytes": info.get("MemTotal"),
        "memory_available_bytes": info.get("MemAvailable"),
        "disk_path": str(path),
        "disk_free_bytes": disk.free,
        "disk_total_bytes": disk.total,
    }


def installed(libs: dict[str, dict[str, Any]], name: str) -> bool:
    if libs[name]["version"] is not None:
        return True
    import_name = IMPORT_NAMES.get(name)
    return bool(import_name) and importlib.util.find_spec(import_name) is not None
