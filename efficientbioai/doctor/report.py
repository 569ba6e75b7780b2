"""The doctor's report: everything it found, as data and as text, and the exit status."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from efficientbioai.benchmark.environment import cpu_info
from efficientbioai.doctor.machine import (
    PIP_CORE,
    RAPL_FIX,
    cpu_advice,
    energy_report,
    gpu_report,
    has_gpu,
    library_versions,
    memory_report,
)
from efficientbioai.doctor.needs import Need, config_needs
from efficientbioai.tables import human_bytes


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
            label = "not usable" if c.get("isa_cap") else "not present"
            out.append(f"  {label:<16} {', '.join(off)}")
        if c.get("isa_cap"):
            out.append(f"  ISA capped by    {c['isa_cap']} (the lines above: what the runtimes may use)")
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
