"""``efficientbioai doctor``: what this machine can run, what is missing and how to get it.

It reports the engines and libraries with their versions, the CPU instructions that decide int8 / bf16
speed (read from ``/proc/cpuinfo``), the GPU, driver, CUDA and TensorRT when present, whether CodeCarbon
can *measure* energy (RAPL counters, NVML) or only *estimate* it, free memory and disk, and what that
means in plain words. With a compress / infer / benchmark config it checks what that config needs and
fails (exit status 1) naming each missing piece and the command that installs it.

Nothing here imports a heavy library just to read its version (``importlib.metadata``); torch is imported
only to ask CUDA about the GPU, and OpenVINO to ask which precisions it optimises for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import platform
import shutil
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from efficientbioai.benchmark.environment import CPU_FLAGS, cpu_info
from efficientbioai.tables import human_bytes

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
_IMPORT_NAMES = {"dask": "distributed", "tensorrt": "tensorrt", "nvidia-ml-py": "pynvml"}

RAPL_GLOB = ("intel-rapl:*", "intel-rapl*")
RAPL_ROOT = Path("/sys/class/powercap")
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


# ------------------------------------------------------------------------------------------------ CPU


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
            "over fp32; try bf16/fp32 too"
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


# ------------------------------------------------------------------------------------------------ GPU


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
            out["driver"] = _text(pynvml.nvmlSystemGetDriverVersion())
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
                        "name": _text(pynvml.nvmlDeviceGetName(h)),
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


def _text(v: Any) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def has_gpu(gpu: dict[str, Any]) -> bool:
    return bool(gpu["devices"]) or bool((gpu.get("torch_cuda") or {}).get("available"))


# --------------------------------------------------------------------------------------------- energy


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


# ------------------------------------------------------------------------------------ memory and disk


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


# ------------------------------------------------------------------------------------- config checks


@dataclass
class Need:
    """Something a config needs, whether this machine has it, and the command that fixes it."""

    what: str
    why: str
    ok: bool
    fix: str | None = None


def _installed(libs: dict[str, dict[str, Any]], name: str) -> bool:
    if libs[name]["version"] is not None:
        return True
    import_name = _IMPORT_NAMES.get(name)
    return bool(import_name) and importlib.util.find_spec(import_name) is not None


def _lib_need(libs, name: str, why: str) -> Need:
    return Need(name, why, _installed(libs, name), libs[name]["install"])


def _gpu_need(gpu: dict[str, Any], why: str) -> Need:
    return Need(
        "NVIDIA GPU",
        why,
        has_gpu(gpu),
        "run on a machine with an NVIDIA GPU and driver (nvidia-smi must list it), or use the CPU engine: "
        "export.targets [openvino] / backend openvino",
    )


def _compress_needs(model: dict, section: dict, libs, gpu, where: str) -> list[Need]:
    needs: list[Need] = []
    kind = str(model.get("kind", ""))
    if kind == "cellpose":
        needs.append(_lib_need(libs, "cellpose", f"{where}model.kind cellpose"))
        model_type = (model.get("options") or {}).get("model_type")
        if model_type and needs[-1].ok:
            needs.append(_cellpose_weights(str(model_type), where))
    elif ":" in kind:
        module = kind.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        needs.append(
            Need(
                f"python module '{module}'",
                f"{where}model.kind {kind} (your own parser)",
                found,
                f"install the package that defines '{module}', or run from the folder that contains it "
                "(or add that folder to PYTHONPATH)",
            )
        )
    elif kind == "monai":
        needs.append(_lib_need(libs, "monai", f"{where}model.kind monai"))
    if section.get("prune"):
        needs.append(_lib_need(libs, "torch-pruning", f"{where}prune"))
    quantize = section.get("quantize") or {}
    if quantize.get("precision", "int8") == "int8" or quantize.get("strategy") == "auto":
        needs.append(_lib_need(libs, "nncf", f"{where}quantize (int8)"))
    targets = (section.get("export") or {}).get("targets") or ["openvino"]
    if "openvino" in targets:
        needs.append(_lib_need(libs, "openvino", f"{where}export.targets openvino"))
    if "tensorrt" in targets:
        why = f"{where}export.targets tensorrt"
        needs += [_gpu_need(gpu, why), _lib_need(libs, "tensorrt", why)]
    return needs


def _cellpose_weights(model_type: str, where: str) -> Need:
    """cellpose's own weights for ``options.model_type`` must be on disk: efficientbioai downloads nothing."""
    from efficientbioai.errors import EfficientBioAIError
    from efficientbioai.models.cellpose import builtin_file

    try:
        path, _ = builtin_file(model_type)
        return Need(f"cellpose weights '{model_type}'", f"{where}model.options.model_type", True, str(path))
    except EfficientBioAIError as exc:
        return Need(f"cellpose weights '{model_type}'", f"{where}model.options.model_type", False, exc.fix)


def _infer_needs(data: dict, libs, gpu) -> list[Need]:
    needs: list[Need] = []
    artifact = Path(str(data.get("model")))
    kind = None
    if (artifact / "manifest.yaml").is_file():
        from efficientbioai.artifact import read_manifest
        from efficientbioai.errors import EfficientBioAIError

        try:
            kind = read_manifest(artifact).model.kind
        except EfficientBioAIError as exc:  # damaged, or written by another version
            needs.append(Need(f"artifact {artifact}", exc.problem, False, exc.fix))
    else:
        needs.append(
            Need(
                f"artifact {artifact}",
                "model",
                False,
                "run `efficientbioai compress` first, or point model at an artifact directory (with manifest.yaml)",
            )
        )
    if kind == "cellpose":
        needs.append(_lib_need(libs, "cellpose", "model: a cellpose artifact"))
    backend = data.get("backend")
    if backend == "tensorrt":
        needs += [_gpu_need(gpu, "backend tensorrt"), _lib_need(libs, "tensorrt", "backend tensorrt")]
    elif backend in ("openvino", "onnxruntime"):
        needs.append(_lib_need(libs, backend, f"backend {backend}"))
    device = str(data.get("device", ""))
    if "cuda" in device or "gpu" in device.lower():
        needs.append(_gpu_need(gpu, f"device {device}"))
    dist = data.get("distributed")
    if dist:
        needs.append(_lib_need(libs, "dask", "distributed"))
        scheduler = str((dist or {}).get("scheduler", "local")) if isinstance(dist, dict) else "local"
        if scheduler.lower() in ("slurm", "pbs", "lsf", "sge", "htcondor", "moab", "oar"):
            needs.append(_lib_need(libs, "dask-jobqueue", f"distributed.scheduler {scheduler}"))
    return needs


def config_needs(path: str | Path, libs=None, gpu=None) -> tuple[str, list[Need]]:
    """(config type, needs) for a compress, infer or benchmark config file.

    The YAML is read, not validated: doctor must be able to say "this needs TensorRT" about a config
    that this installation would refuse.
    """
    from efficientbioai.config import read_config_file

    libs = libs if libs is not None else library_versions()
    gpu = gpu if gpu is not None else gpu_report()
    data = read_config_file(Path(path))
    needs = [_lib_need(libs, lib.name, "every command") for lib in LIBRARIES if lib.required]
    if "variants" in data:
        kind = "benchmark"
        shared = data.get("compress") or {}
        needs += _compress_needs(data.get("model") or {}, shared, libs, gpu, "")
        for v in data.get("variants") or []:
            if isinstance(v, dict):
                merged = {**shared, **{k: v[k] for k in v if k != "name"}}
                needs += _compress_needs(
                    data.get("model") or {}, merged, libs, gpu, f"variant {v.get('name')}: "
                )
        for d in data.get("devices") or []:
            if "cuda" in str(d) or "gpu" in str(d).lower():
                needs.append(_gpu_need(gpu, f"devices {d}"))
    elif isinstance(data.get("model"), dict):
        kind = "compress"
        needs += _compress_needs(data["model"], data, libs, gpu, "")
    else:
        kind = "infer"
        needs += _infer_needs(data, libs, gpu)
    unique: dict[tuple[str, bool], Need] = {}
    for n in needs:  # one line per missing / present piece, the first reason kept
        unique.setdefault((n.what, n.ok), n)
    return kind, list(unique.values())


# ----------------------------------------------------------------------------------------- the report


@dataclass
class DoctorReport:
    system: dict[str, Any]
    libraries: dict[str, dict[str, Any]]
    cpu: dict[str, Any]
    gpu: dict[str, Any]
    energy: dict[str, Any]
    resources: dict[str, Any]
    advice: list[str]
    missing: list[dict[str, str]]
    config: dict[str, Any] | None = None
    needs: list[Need] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        core = all(v["version"] for v in self.libraries.values() if v["required"])
        return core and all(n.ok for n in self.needs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def text(self) -> str:
        out = [f"efficientbioai doctor — {self.system['efficientbioai']} on {self.system['os']}"]
        out.append("\nLibraries")
        for name, v in self.libraries.items():
            version = v["version"] or ("MISSING" if v["required"] else "not installed")
            out.append(f"  {name:<16} {version:<14} {v['role']}")
        c = self.cpu
        out.append("\nCPU")
        out.append(f"  model            {c['model']} ({c['architecture']})")
        out.append(f"  cores            {c['usable_cores']} usable of {c['logical_cores']} logical")
        on = [n for n, v in c["flags"].items() if v]
        off = [n for n, v in c["flags"].items() if not v and n in _X86_SHOWN]
        out.append(f"  instructions     {', '.join(on) or 'none of note'}")
        if c["architecture"].lower() in ("x86_64", "amd64") and off:
            out.append(f"  not present      {', '.join(off)}")
        caps = ", ".join(c.get("openvino_capabilities") or []) or "-"
        out.append(f"  OpenVINO sees    {caps}")
        g = self.gpu
        out.append("\nGPU")
        if g["devices"]:
            for d in g["devices"]:
                out.append(
                    f"  GPU {d['index']}            {d['name']}, {human_bytes(d['memory_bytes'])}, "
                    f"energy counter: {'yes' if d['energy_counter'] else 'no'}"
                )
            out.append(f"  driver           {g['driver']} (CUDA {g['cuda_driver']})")
        else:
            out.append(f"  none             NVML: {g['nvml']}")
        tc = g.get("torch_cuda") or {}
        out.append(
            f"  torch CUDA       {'available' if tc.get('available') else 'not available'} "
            f"(torch built for CUDA {tc.get('cuda_build') or 'none: CPU build'})"
        )
        trt = self.libraries["tensorrt"]["version"]
        out.append(f"  TensorRT         {trt or 'not installed'}")
        e = self.energy
        out.append("\nEnergy (CodeCarbon offline tracker, NVML)")
        out.append(f"  CPU              {e['cpu']}")
        out.append(f"  RAM              {e['ram']}")
        out.append(f"  GPU              {e['gpu']}")
        r = self.resources
        out.append("\nMemory and disk")
        out.append(
            f"  memory           {human_bytes(r['memory_available_bytes'])} available of "
            f"{human_bytes(r['memory_total_bytes'])}"
        )
        out.append(
            f"  disk             {human_bytes(r['disk_free_bytes'])} free of {human_bytes(r['disk_total_bytes'])} "
            f"({r['disk_path']})"
        )
        out.append("\nWhat this means")
        out += [f"  - {line}" for line in self.advice]
        if self.missing:
            out.append("\nNot installed (install only what you need)")
            for m in self.missing:
                out.append(f"  {m['name']:<16} for {m['role']}: {m['install']}")
        if self.config is not None:
            out.append(f"\nConfig {self.config['path']} ({self.config['kind']})")
            core = [n for n in self.needs if n.why == "every command" and n.ok]
            if core:
                out.append(f"  ok      {'core libraries':<28} {', '.join(n.what for n in core)}")
            for n in self.needs:
                if n in core:
                    continue
                mark = "ok     " if n.ok else "MISSING"
                out.append(f"  {mark} {n.what:<28} needed by {n.why}")
                if not n.ok and n.fix:
                    out.append(f"          fix: {n.fix}")
            missing = [n.what for n in self.needs if not n.ok]
            out.append(
                f"  → this config cannot run here: missing {', '.join(missing)}"
                if missing
                else "  → everything this config needs is here"
            )
        return "\n".join(out)


_X86_SHOWN = {"AVX2", "AVX-512", "AVX-512 VNNI", "AVX-VNNI", "AVX-512 BF16", "AVX-512 FP16", "AMX"}


def diagnose(config: str | Path | None = None, path: str | Path = ".") -> DoctorReport:
    """Everything ``efficientbioai doctor`` prints, as data."""
    import efficientbioai

    libs = library_versions()
    cpu = cpu_info()
    gpu = gpu_report()
    energy = energy_report(libs, gpu)
    advice = cpu_advice(cpu["flags"], cpu["architecture"])
    if has_gpu(gpu):
        trt = libs["tensorrt"]["version"]
        advice.append(
            f"GPU present: TensorRT {trt} can build GPU engines"
            if trt
            else "GPU present but TensorRT is not installed: pip install tensorrt-cu12 for GPU engines"
        )
    else:
        advice.append("no NVIDIA GPU: engines run on the CPU (OpenVINO); TensorRT cannot be used here")
    advice.append(
        "energy figures will be measured (RAPL)"
        if energy["cpu_method"] == "measured"
        else "energy figures will be estimates (reports say 'estimated'), not measurements"
        if energy["cpu_method"] == "estimated"
        else "energy will not be reported (CodeCarbon missing)"
    )
    missing_core = [n for n, v in libs.items() if v["required"] and not v["version"]]
    if missing_core:
        advice.append(f"efficientbioai cannot run: {', '.join(missing_core)} missing ({PIP_CORE})")
    missing = [
        {"name": n, "role": v["role"], "install": v["install"]}
        for n, v in libs.items()
        if not v["version"] and not (n == "tensorrt" and not has_gpu(gpu))
    ]
    if energy["rapl"]["zones"] and not energy["rapl"]["readable"]:
        missing.append({"name": "RAPL access", "role": "measured CPU energy", "install": RAPL_FIX})
    report = DoctorReport(
        system={
            "efficientbioai": efficientbioai.__version__,
            "os": platform.platform(),
            "python": platform.python_version(),
            "cpu_flags_source": "/proc/cpuinfo",
        },
        libraries=libs,
        cpu=cpu,
        gpu=gpu,
        energy=energy,
        resources=memory_report(Path(path)),
        advice=advice,
        missing=missing,
    )
    if config is not None:
        kind, needs = config_needs(config, libs, gpu)
        report.config = {"path": str(config), "kind": kind}
        report.needs = needs
    return report


__all__ = ["CPU_FLAGS", "DoctorReport", "Need", "config_needs", "cpu_advice", "diagnose", "rapl_status"]
