"""Energy readings and how they are labelled: measured (hardware counters) or estimated, in words."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KWH_TO_J = 3.6e6


TRACKING_MODE = "process"


MEASURED = "measured"


ESTIMATED = "estimated"


UNAVAILABLE = "unavailable"


# CodeCarbon CPU modes that read a hardware energy/power counter; anything else (cpu_load, constant) is a model.
MEASURED_CPU_MODES = frozenset({"intel_rapl", "intel_power_gadget", "apple_powermetrics", "windows_emi"})


# CodeCarbon hardware classes that are counters by construction (powermetrics, Raspberry Pi PMIC).
MEASURED_HARDWARE_CLASSES = frozenset({"AppleSiliconChip", "Raspberry"})


@dataclass
class EnergyReading:
    """Energy of one measured block.

    ``details`` keys (present when known): ``cpu_joules``, ``ram_joules``, ``gpu_joules``, ``cpu_power_w``,
    ``ram_power_w``, ``gpu_power_w`` (mean power over the block), ``parts`` (part -> method),
    ``tracker_seconds`` / ``tracker_joules`` (window covered by CodeCarbon's task, a few ms longer than the
    block, and its CPU + RAM energy; ``cpu_joules`` and ``ram_joules`` are scaled to the block's ``seconds``),
    ``tracking_mode``, ``cpu_mode``, ``tdp_w``, ``reason`` (why something is unavailable).
    """

    joules: float | None
    method: str
    source: str
    seconds: float
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Measurement:
    """Handle yielded by :meth:`EnergyMeter.measure`; ``reading`` is set when the block exits."""

    def __init__(self) -> None:
        self.reading: EnergyReading | None = None


def format_energy(reading: EnergyReading | None) -> str:
    """``"12.3 J (estimated)"``, or ``"-"`` when there is no energy figure."""
    if reading is None or reading.joules is None or reading.method == UNAVAILABLE:
        return "-"
    text = f"{joules_text(reading.joules)} ({reading.method})"
    gpu_j = reading.details.get("gpu_joules")
    if gpu_j is not None and reading.details.get("parts", {}).get("gpu") == MEASURED:
        # the GPU part is a hardware counter even when the CPU part is a model
        text += f", GPU {joules_text(gpu_j)} {GPU_LABEL}"
    return text


GPU_LABEL = "measured (NVML)"


def joules_text(joules: float) -> str:
    if joules >= 1000:
        return f"{joules / 1000:.3g} kJ"
    if joules >= 100:
        return f"{joules:.0f} J"
    if joules >= 0.1:
        return f"{joules:.3g} J"
    return f"{joules * 1000:.3g} mJ"


CPU_TIME_ESTIMATE = "estimated from CPU time × an assumed power"


def energy_basis(method: str | None, details: dict[str, Any] | None) -> str:
    """How an energy figure was obtained, in words a reader can check.

    A CodeCarbon ``cpu_load`` / ``constant`` CPU figure is the process's CPU time × a power taken from
    CodeCarbon's table for the CPU's model name (e.g. 8 W for "AMD EPYC", far below a real EPYC's
    package power): it is a model, not a measurement, and a ratio of two such figures is essentially
    the ratio of their CPU times.
    """
    details = details or {}
    if method in (None, UNAVAILABLE):
        return "unavailable"
    if method == MEASURED:
        counters = details.get("counters") or "hardware energy counters"
        return f"measured ({counters})"
    cpu_mode = details.get("cpu_mode")
    if cpu_mode in MEASURED_CPU_MODES:
        return "estimated (CPU from a hardware counter, RAM from CodeCarbon's power model)"
    if not is_cpu_time_estimate(method, details):
        return "estimated (a model, not a measurement)"
    tdp = details.get("tdp_w")
    power = f"{tdp:g} W, CodeCarbon's figure for this CPU model, not measured" if tdp is not None else None
    return f"{CPU_TIME_ESTIMATE}" + (f" ({power})" if power else "") + " + a RAM power model"


def is_cpu_time_estimate(method: str | None, details: dict[str, Any] | None) -> bool:
    """True when the figure is CPU time × an assumed power (so its ratios restate CPU-time ratios).

    That is CodeCarbon's ``cpu_load`` mode (in process tracking: the process's CPU time × TDP / cores).
    """
    details = details or {}
    return method == ESTIMATED and details.get("cpu_mode") == "cpu_load"


def energy_ratio_text(ratio: float, method: str | None, details: dict[str, Any] | None) -> str:
    """'uses 3.2x less energy (<how it was obtained>)', never a bare saving."""
    amount = f"{ratio:.2f}x less" if ratio >= 1 else f"{1 / ratio:.2f}x more"
    if is_cpu_time_estimate(method, details):
        return (
            f"uses {amount} energy ({CPU_TIME_ESTIMATE}, not measured: this is close to the ratio of "
            "CPU times, not a measured saving)"
        )
    return f"uses {amount} energy ({energy_basis(method, details)})"


def energy_summary(readings: list[EnergyReading | None]) -> str | None:
    """'energy: <how it was obtained> — <sources>' for the readings that have a figure, or None."""
    have = [e for e in readings if e is not None and e.joules is not None]
    if not have:
        return None
    bases = sorted({energy_basis(e.method, e.details) for e in have})
    sources = sorted({e.source for e in have if e.source})
    text = f"energy: {'; '.join(bases)} — {'; '.join(sources)}"
    if any(is_cpu_time_estimate(e.method, e.details) for e in have):
        text += (
            ". No power counter was read (RAPL under /sys/class/powercap absent or not readable): these "
            "joules are a model; compare them only within this report"
        )
    return text


def combine_methods(methods: list[str]) -> str:
    if not methods or UNAVAILABLE in methods:
        return UNAVAILABLE
    return MEASURED if all(m == MEASURED for m in methods) else ESTIMATED
