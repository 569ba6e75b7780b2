"""The CPU's instruction sets as the inference runtimes may use them.

Which int8 instructions a CPU has changes *results*, not only speed: x86 CPUs without a VNNI dot
product (AVX2-only, AVX-512 without VNNI) multiply u8 × s8 pairs into saturating 16-bit sums, so an
int8 network quantized for a VNNI CPU loses accuracy there unless its weights leave headroom (NNCF's
overflow fix). OpenVINO and oneDNN can be told to use less than the hardware has
(``OV_CPU_MAX_ISA`` / ``ONEDNN_MAX_CPU_ISA``, e.g. ``AVX2`` to behave like an AVX2-only machine);
the flags here honour that cap, so that what ``doctor`` and ``compress`` say matches what the
engines do.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

CPU_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_tile": "AMX",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "amx_fp16": "AMX-FP16",
    "asimd": "NEON",
    "asimddp": "NEON dot product",
    "sve": "SVE",
}
"""/proc/cpuinfo flags that matter for compressed inference, with the names reports use."""

ISA_CAP_VARIABLES = ("OV_CPU_MAX_ISA", "ONEDNN_MAX_CPU_ISA")
"""Environment variables that cap the instruction sets OpenVINO (and its oneDNN) dispatch to."""

_AVX2 = {"AVX2", "FMA"}
_AVX512 = _AVX2 | {"AVX-512"}
# what each oneDNN ISA name (as ONEDNN_MAX_CPU_ISA takes it) lets a runtime use, of the flags above
_CAPS: dict[str, set[str]] = {
    "SSE41": set(),
    "AVX": set(),
    "AVX2": _AVX2,
    "AVX2_VNNI": _AVX2 | {"AVX-VNNI"},
    "AVX2_VNNI_2": _AVX2 | {"AVX-VNNI"},
    "AVX512_CORE": _AVX512,
    "AVX512_CORE_VNNI": _AVX512 | {"AVX-512 VNNI"},
    "AVX512_CORE_BF16": _AVX512 | {"AVX-512 VNNI", "AVX-512 BF16"},
    "AVX512_CORE_FP16": _AVX512 | {"AVX-512 VNNI", "AVX-512 BF16", "AVX-512 FP16", "AVX-VNNI"},
    "AVX10_1_512": _AVX512 | {"AVX-512 VNNI", "AVX-512 BF16", "AVX-512 FP16", "AVX-VNNI"},
    "AVX512_CORE_AMX": _AVX512
    | {"AVX-512 VNNI", "AVX-512 BF16", "AVX-512 FP16", "AVX-VNNI", "AMX", "AMX-INT8", "AMX-BF16"},
    "AVX10_1_512_AMX": _AVX512
    | {"AVX-512 VNNI", "AVX-512 BF16", "AVX-512 FP16", "AVX-VNNI", "AMX", "AMX-INT8", "AMX-BF16"},
}
_X86_NAMES = {
    "AVX2", "FMA", "AVX-512", "AVX-512 VNNI", "AVX-VNNI", "AVX-512 BF16", "AVX-512 FP16",
    "AMX", "AMX-INT8", "AMX-BF16", "AMX-FP16",
}  # fmt: skip


def read_cpuinfo() -> tuple[str, set[str]]:
    """The first core's model name and its raw /proc/cpuinfo flags (empty where there is no such file)."""
    model, flags = None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model is None:  # the first core's (x86; some ARM kernels too)
                model = value.strip()
            elif key in ("flags", "Features") and not flags:  # x86 / ARM
                flags = set(value.split())
    return model or platform.processor() or "unknown", flags


def isa_cap() -> dict[str, str] | None:
    """The ISA cap set in the environment (variable → value), or None when the runtimes use all of it."""
    cap = {v: os.environ[v].strip().upper() for v in ISA_CAP_VARIABLES if os.environ.get(v, "").strip()}
    return cap or None


def _allowed(cap: dict[str, str] | None) -> set[str] | None:
    """The x86 flag names a cap allows (the tightest of the variables set); None: no cap."""
    if not cap:
        return None
    allowed: set[str] | None = None
    for value in (v.strip().upper() for v in cap.values()):
        if value in ("ALL", "DEFAULT"):
            continue
        names = _CAPS.get(value)
        if names is None:  # an unknown name: the runtimes ignore it, and so do we
            continue
        allowed = names if allowed is None else allowed & names
    return allowed


def cpu_flags(raw: set[str] | None = None, cap: dict[str, str] | None = None) -> dict[str, bool]:
    """Report name → whether the runtimes may use it: present on the CPU and allowed by the ISA cap."""
    if raw is None:
        raw = read_cpuinfo()[1]
    if cap is None:
        cap = isa_cap()
    allowed = _allowed(cap)
    out = {}
    for flag, name in CPU_FLAGS.items():
        present = flag in raw
        if present and allowed is not None and name in _X86_NAMES:
            present = name in allowed
        out[name] = present
    return out


def int8_dot_product(flags: dict[str, bool] | None = None) -> str | None:
    """The int8 dot-product instructions OpenVINO uses on this x86 CPU (AMX-INT8, AVX-512 VNNI,
    AVX-VNNI), or None where int8 convolutions use saturating 16-bit sums (AVX2 / AVX-512 without VNNI)."""
    f = cpu_flags() if flags is None else flags
    for name in ("AMX-INT8", "AVX-512 VNNI", "AVX-VNNI"):
        if f.get(name):
            return name
    return None


def int8_saturates(flags: dict[str, bool] | None = None, architecture: str | None = None) -> bool:
    """Whether int8 convolutions on this CPU saturate 16-bit intermediate sums (x86 without VNNI)."""
    arch = (architecture or platform.machine()).lower()
    if arch not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return int8_dot_product(flags) is None


def flags_line(flags: dict[str, bool]) -> str:
    """The names of the flags that are on, for one line of a report."""
    return ", ".join(name for name, on in flags.items() if on) or "none of interest"


def describe_cap(cap: dict[str, str] | None = None) -> str | None:
    """``OV_CPU_MAX_ISA=AVX2, ONEDNN_MAX_CPU_ISA=AVX2`` or None."""
    cap = isa_cap() if cap is None else cap
    return ", ".join(f"{k}={v}" for k, v in cap.items()) if cap else None


def cpu_record() -> dict[str, Any]:
    """What an artifact records of the CPU it was compressed on: model, int8 instructions, ISA cap."""
    model, raw = read_cpuinfo()
    flags = cpu_flags(raw)
    return {
        "model": model,
        "architecture": platform.machine(),
        "int8_dot_product": int8_dot_product(flags),
        "isa_cap": describe_cap(),
    }
