"""``efficientbioai doctor``: what this machine can run, what is missing and how to get it.

It reports the engines and libraries with their versions, the CPU instructions that decide int8 / bf16
speed (read from ``/proc/cpuinfo``), the GPU, driver, CUDA and TensorRT when present, whether CodeCarbon
can *measure* energy (RAPL counters, NVML) or only *estimate* it, free memory and disk, and what that
means in plain words. With a compress / infer / benchmark config it checks what that config needs and
fails (exit status 1) naming each missing piece and the command that installs it.

Nothing here imports a heavy library just to read its version (``importlib.metadata``); torch is imported
only to ask CUDA about the GPU, and OpenVINO to ask which precisions it optimises for.
"""

from efficientbioai.cpu import CPU_FLAGS
from efficientbioai.doctor.machine import cpu_advice, gpu_report, has_gpu, library_versions, rapl_status
from efficientbioai.doctor.needs import Need, config_needs
from efficientbioai.doctor.report import DoctorReport, diagnose

__all__ = [
    "CPU_FLAGS",
    "DoctorReport",
    "Need",
    "config_needs",
    "cpu_advice",
    "diagnose",
    "gpu_report",
    "has_gpu",
    "library_versions",
    "rapl_status",
]
