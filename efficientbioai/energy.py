"""Timers and energy meters for the inference report.

Usage::

    meter = EnergyMeter(gpu_index=None)      # ~1.5 s the first time in a process (hardware probe)
    for batch in batches:
        with meter.measure() as m:
            run_model(batch)                  # for GPU work, synchronize before leaving the block
        print(format_energy(m.reading), m.reading.seconds)
    meter.close()

Every reading says how its number was obtained (``EnergyReading.method``):

* ``"measured"``: every part comes from a hardware energy counter (RAPL, Intel Power Gadget,
  Apple powermetrics, Windows EMI, a Raspberry Pi PMIC, NVML's GPU energy counter);
* ``"estimated"``: at least one part is a model, e.g. CodeCarbon's CPU load x TDP model or its RAM
  power model (a fixed number of watts per DIMM). CodeCarbon only ever *models* DRAM power on x86,
  so a reading that includes RAM is "estimated" even when the CPU part comes from RAPL; the per-part
  methods are in ``details["parts"]``;
* ``"unavailable"``: no meter could run (disabled, CodeCarbon missing or failing); ``joules`` is None
  but ``seconds`` is still timed.

CPU + RAM energy (CodeCarbon)
-----------------------------
Only ``codecarbon.OfflineEmissionsTracker`` is used: it never looks the location up online; all outputs
(CSV file, API, Prometheus, logger) and the Electricity Maps token are switched off, so it makes no
network access and writes no file. Its logger is set to ERROR before the tracker is built (CodeCarbon
resets it to INFO when imported and logs warnings from its constructor).

One tracker is built per :class:`EnergyMeter`, and each block is measured with the tracker's task API
(``start_task`` / ``stop_task``), which was checked with CodeCarbon 3.3.2 on 0.05-2 s blocks of busy
NumPy work: the returned CPU and RAM energies are proportional to the block's duration and load (e.g.
8 W TDP at ~100% load: 0.36 J for 0.05 s, 8.0 J for 1 s), consecutive tasks are independent (each
task's energy is the difference of the tracker's totals at start and stop, and the CPU load baseline is
reset by ``start_task``), and start + stop cost ~1-5 ms. Three details of that API are not usable as
they are, and are worked around here:

* ``EmissionsData.cpu_power`` / ``ram_power`` of a task are running averages over the tracker's whole
  life, not the task's, so the powers in ``details`` are recomputed as energy / window;
* the task's energy covers a window a few ms longer than the block (CodeCarbon's own bookkeeping at
  start and stop), and its ``duration`` is a few ms off that window: the window is taken from the
  tracker's measurement timestamps and the block is billed the window's mean power x the block's
  duration (an empty block gets ~0 J, not 10 W x 3 ms of RAM);
* the energies are kWh (converted with x 3.6e6), and ``energy_consumed`` also holds CodeCarbon's own
  GPU energy for *all* GPUs; it is not used: the total is CPU + RAM from CodeCarbon plus, when asked
  for, one GPU read directly from NVML.

Finished tasks are removed from the tracker so that a long run does not accumulate them.

Tracking mode: ``"process"``. The report compares models run by this process, often on shared machines
(CI, other jobs, a laptop with a browser open). In ``"machine"`` mode CodeCarbon's cpu_load model uses
the load of the whole machine (plus a floor of 10% of TDP) and the RAM of the whole machine, so other
programs' work would be billed to the model and make readings noisy; in ``"process"`` mode the CPU
estimate is ``TDP x (CPU time of this process and its children) / (wall time x logical CPUs)`` and the RAM
estimate is based on this process's memory (in practice CodeCarbon's floor of two DIMMs, 10 W on x86,
for up to 16 GB). Hardware counters (RAPL...) are package-wide whatever the
mode, so "measured" CPU energy still includes everything that ran on the package meanwhile.

GPU energy (NVML)
-----------------
With ``gpu_index`` set (NVML index, as in ``nvidia-smi``, which is not necessarily the CUDA index when
``CUDA_VISIBLE_DEVICES`` reorders devices), ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since
the driver was loaded; Volta and newer) is read just before and just after the block. The counter is a
whole-GPU counter that the driver may refresh only every few tens of milliseconds, so very short blocks
are coarse: measure batches, not single tiny calls. If NVML cannot be used the meter warns once and measures CPU + RAM only
(``details["parts"]["gpu"] == "unavailable"``). If CodeCarbon cannot run, readings are "unavailable"
(joules None) even when the GPU was read: a GPU-only number would pass for a total; the GPU figure is
still in ``details["gpu_joules"]``.

Energy measurement never raises into the measured code: failures give a warning (once per meter and
reason) and "unavailable" parts. Exceptions raised *by the block* propagate unchanged, after the reading
has been stored.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EnergyMeter",
    "EnergyReading",
    "Measurement",
    "energy_basis",
    "energy_ratio_text",
    "energy_summary",
    "format_energy",
    "is_cpu_time_estimate",
]

KWH_TO_J = 3.6e6
TRACKING_MODE = "process"

MEASURED = "measured"
ESTIMATED = "estimated"
UNAVAILABLE = "unavailable"

# CodeCarbon CPU modes that read a hardware energy/power counter; anything else (cpu_load, constant) is a model.
_MEASURED_CPU_MODES = frozenset({"intel_rapl", "intel_power_gadget", "apple_powermetrics", "windows_emi"})
# CodeCarbon hardware classes that are counters by construction (powermetrics, Raspberry Pi PMIC).
_MEASURED_HARDWARE_CLASSES = frozenset({"AppleSiliconChip", "Raspberry"})


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
    text = f"{_joules_text(reading.joules)} ({reading.method})"
    gpu_j = reading.details.get("gpu_joules")
    if gpu_j is not None and reading.details.get("parts", {}).get("gpu") == MEASURED:
        # the GPU part is a hardware counter even when the CPU part is a model
        text += f", GPU {_joules_text(gpu_j)} {GPU_LABEL}"
    return text


GPU_LABEL = "measured (NVML)"


def _joules_text(joules: float) -> str:
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
    if cpu_mode in _MEASURED_CPU_MODES:
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


def _combine_methods(methods: list[str]) -> str:
    if not methods or UNAVAILABLE in methods:
        return UNAVAILABLE
    return MEASURED if all(m == MEASURED for m in methods) else ESTIMATED


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _CodeCarbonPart:
    """CPU + RAM energy of blocks, with one OfflineEmissionsTracker and its task API."""

    def __init__(self, country_iso_code: str) -> None:
        import codecarbon
        from codecarbon import OfflineEmissionsTracker

        # Importing codecarbon sets its logger to INFO with a stderr handler, and the tracker's
        # constructor logs warnings before it applies log_level: silence it first.
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self.version = str(getattr(codecarbon, "__version__", "?"))
        self._tracker = OfflineEmissionsTracker(
            **self._tracker_kwargs(OfflineEmissionsTracker, country_iso_code)
        )
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        self._names = itertools.count()
        self._window_start: float | None = None
        # The tracker's constructor swallows its own exceptions, and the hardware probe (~1-1.5 s the first
        # time in a process, cached by CodeCarbon afterwards) runs on the first task: run an empty task now,
        # so that the cost is paid here and a broken tracker is detected before any real measurement.
        self.start()
        self.stop()
        self.parts, self.description, self.static_details = self._describe()

    @staticmethod
    def _tracker_kwargs(tracker_cls: type, country_iso_code: str) -> dict[str, Any]:
        accepted: set[str] = set()
        for klass in tracker_cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            with contextlib.suppress(TypeError, ValueError):
                accepted |= set(inspect.signature(init).parameters)
        kwargs: dict[str, Any] = {
            "country_iso_code": country_iso_code,
            "log_level": "error",
            "tracking_mode": TRACKING_MODE,
            "project_name": "efficientbioai",
        }
        if "output_methods" in accepted:
            # CodeCarbon >= 3: an empty list switches off every output (CSV file, API, logger, Prometheus...)
            # and save_to_file=False would only add a DeprecationWarning.
            kwargs["output_methods"] = []
        else:
            kwargs.update(save_to_file=False, save_to_api=False)
        optional = {
            "allow_multiple_runs": True,  # no lock file: other processes may measure at the same time
            "emissions_endpoint": None,  # never post anywhere, whatever a config file says
            "electricitymaps_api_token": "",  # never ask Electricity Maps, even if a token is configured
        }
        kwargs.update({k: v for k, v in optional.items() if k in accepted})
        return kwargs

    def start(self) -> None:
        self._tracker.start_task(f"efficientbioai-block-{next(self._names)}")
        if getattr(self._tracker, "_active_task", "unknown") is None:
            raise RuntimeError("CodeCarbon did not start the task (see codecarbon logs at DEBUG level)")
        # Start of the window the task's energy covers (perf_counter time of CodeCarbon's last measurement).
        self._window_start = getattr(self._tracker, "_last_measured_time", None)

    def stop(self) -> tuple[float, float, float | None]:
        """Return (cpu_joules, ram_joules, seconds covered by these energies)."""
        name = getattr(self._tracker, "_active_task", None)
        data = self._tracker.stop_task()
        tasks = getattr(self._tracker, "_tasks", None)
        if isinstance(tasks, dict) and name is not None:
            tasks.pop(name, None)
        if data is None:
            raise RuntimeError("CodeCarbon returned no data for the task")
        cpu_j = max(0.0, float(data.cpu_energy) * KWH_TO_J)
        ram_j = max(0.0, float(data.ram_energy) * KWH_TO_J)
        # The task's `duration` runs from the end of start_task to the end of stop_task, a few ms off the
        # window its energy covers; use the tracker's measurement timestamps when they are there.
        start, end = self._window_start, getattr(self._tracker, "_last_measured_time", None)
        if isinstance(start, float) and isinstance(end, float) and end > start:
            return cpu_j, ram_j, end - start
        duration = getattr(data, "duration", None)
        return cpu_j, ram_j, float(duration) if duration is not None else None

    def abandon(self) -> None:
        """Best-effort stop of the tracker's timer threads (after a failure, or on close)."""
        for name in ("_scheduler_monitor_power", "_scheduler"):
            scheduler = getattr(self._tracker, name, None)
            with contextlib.suppress(Exception):
                if scheduler is not None:
                    scheduler.stop()

    def _describe(self) -> tuple[dict[str, str], str, dict[str, Any]]:
        """Per-part methods and a short description, from the hardware objects CodeCarbon actually uses."""
        cpu_method, ram_method = ESTIMATED, ESTIMATED
        cpu_text, ram_text = "CPU ?", "RAM ?"
        details: dict[str, Any] = {"tracking_mode": TRACKING_MODE}
        hardware = getattr(self._tracker, "_hardware", None)
        for hw in hardware if isinstance(hardware, list | tuple) else []:
            kind = type(hw).__name__
            chip_part = getattr(hw, "chip_part", None)
            if kind == "CPU":
                mode = getattr(hw, "_mode", None)
                model = getattr(hw, "_model", None) or "unknown CPU"
                tdp = getattr(hw, "_tdp", None)
                cpu_method = MEASURED if mode in _MEASURED_CPU_MODES else ESTIMATED
                cpu_text = f"{mode or 'unknown'} mode: {model}"
                if cpu_method == ESTIMATED and tdp is not None:
                    generic = " generic" if getattr(hw, "_is_generic_tdp", False) else ""
                    cpu_text += f", TDP {tdp:g} W{generic}"
                    details["tdp_w"] = tdp
                    details["tdp_generic"] = bool(generic)
                details["cpu_mode"] = mode
            elif kind in _MEASURED_HARDWARE_CLASSES and chip_part in ("CPU", "RAM"):
                if chip_part == "CPU":
                    cpu_method, cpu_text = MEASURED, f"{kind}: {getattr(hw, '_model', '?')}"
                    details["cpu_mode"] = kind
                else:
                    ram_method, ram_text = MEASURED, f"{kind} RAM"
            elif kind == "RAM":
                forced = getattr(hw, "_force_ram_power", None)
                ram_method = ESTIMATED
                ram_text = f"RAM constant {forced:g} W" if forced is not None else "RAM power model"
        parts = {"cpu": cpu_method, "ram": ram_method}
        description = f"codecarbon {self.version} ({cpu_text}; {ram_text}; {TRACKING_MODE} tracking)"
        return parts, description, details


RAPL_ROOT = "/sys/class/powercap"


class _RaplPart:
    """CPU package (and DRAM) energy from the kernel's RAPL counters, read directly from powercap.

    The ``intel-rapl`` powercap driver also serves AMD Zen CPUs. Package domains are ``intel-rapl:N``
    (name ``package-N``); a DRAM sub-domain ``intel-rapl:N:M`` (name ``dram``) is used when present.
    Counters are microjoules that wrap at ``max_energy_range_uj``. They are package-wide: everything
    that ran on the package meanwhile is included. Same interface as :class:`_CodeCarbonPart`.
    """

    def __init__(self, root: str | Path) -> None:
        self.domains: dict[str, tuple[Path, int]] = {}
        for d in sorted(Path(root).glob("intel-rapl:*")):
            try:
                name = (d / "name").read_text().strip()
            except OSError:
                continue
            if not (name.startswith("package") or name == "dram"):
                continue  # psys / core / uncore would count the same joules twice
            label = name if name.startswith("package") else f"{name}-{d.name.split(':')[1]}"
            try:
                wrap = int((d / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                wrap = 0
            self.domains[label] = (d / "energy_uj", wrap)
        if not any(k.startswith("package") for k in self.domains):
            raise FileNotFoundError(f"no RAPL package domain under {root}")
        self._read()  # PermissionError here when the counters are root-only
        self._before: dict[str, int] | None = None
        has_dram = any(k.startswith("dram") for k in self.domains)
        self.parts = {"cpu": MEASURED, **({"ram": MEASURED} if has_dram else {})}
        names = " + ".join(self.domains)
        counters = f"RAPL {names}, package-wide" + ("" if has_dram else "; RAM not included")
        self.description = f"rapl counters ({names}; whole package{'' if has_dram else ', no DRAM domain'})"
        self.static_details = {"cpu_mode": "rapl", "counters": counters, "tracking_mode": "package"}

    def _read(self) -> dict[str, int]:
        return {k: int(path.read_text()) for k, (path, _) in self.domains.items()}

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> tuple[float, float, float | None]:
        after = self._read()
        cpu = ram = 0.0
        for k, b in (self._before or after).items():
            delta = after[k] - b
            if delta < 0:  # the counter wrapped around
                delta += self.domains[k][1]
            if k.startswith("dram"):
                ram += delta / 1e6
            else:
                cpu += delta / 1e6
        return cpu, ram, None

    def abandon(self) -> None:
        pass


class _NvmlPart:
    """Energy counter of one NVIDIA GPU (millijoules since the driver was loaded)."""

    def __init__(self, gpu_index: int) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
            self.read_mj()  # fails here on GPUs without the counter (before Volta)
            name = pynvml.nvmlDeviceGetName(self._handle)
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        except BaseException:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            raise
        self.description = f"nvml GPU{gpu_index} ({name})"

    def read_mj(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


class EnergyMeter:
    """Times blocks and measures their energy; build once, then ``with meter.measure() as m: ...`` many times.

    ``enabled=False`` only times blocks. ``country_iso_code`` is passed to CodeCarbon's offline tracker (it
    only affects its CO2 figures, not energy). ``gpu_index``: NVML index of a GPU to meter too. Blocks must
    not be nested, and a meter must be used from one thread at a time.
    """

    def __init__(
        self,
        enabled: bool = True,
        country_iso_code: str = "USA",
        gpu_index: int | None = None,
        rapl_root: str | Path | None = RAPL_ROOT,
    ):
        self.enabled = enabled
        self.gpu_index = gpu_index
        self._cc: _CodeCarbonPart | _RaplPart | None = None
        self.rapl_note: str | None = None  # why RAPL counters were not used (when they exist)
        self._gpu: _NvmlPart | None = None
        self._reason: str | None = None  # why CPU/RAM energy is unavailable
        self._gpu_reason: str | None = None
        self._warned: set[str] = set()
        self._active = False
        self._closed = False
        if not enabled:
            self._reason = "energy measurement disabled"
            return
        if rapl_root is not None and Path(rapl_root).is_dir():
            try:
                self._cc = _RaplPart(rapl_root)
            except PermissionError:
                self.rapl_note = (
                    "RAPL counters exist but are readable by root only (run as root, or "
                    f"`sudo chmod a+r {rapl_root}/intel-rapl:*/energy_uj`); CPU energy is estimated instead"
                )
                self._warn(self.rapl_note)
            except OSError:
                pass  # no package domain: CodeCarbon decides
        if self._cc is None:
            try:
                self._cc = _CodeCarbonPart(country_iso_code)
            except Exception as exc:  # ImportError, or anything CodeCarbon raises on this machine
                self._reason = f"CodeCarbon unavailable ({_short_error(exc)})"
                self._warn(f"Energy will not be reported: {self._reason}.")
        if gpu_index is not None:
            try:
                self._gpu = _NvmlPart(gpu_index)
            except Exception as exc:
                self._gpu_reason = f"NVML unavailable for GPU {gpu_index} ({_short_error(exc)})"
                self._warn(f"GPU energy will not be reported, CPU and RAM only: {self._gpu_reason}.")

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _disable_cpu(self, exc: BaseException) -> None:
        if self._cc is not None:
            self._cc.abandon()
        self._cc = None
        self._reason = f"CodeCarbon failed ({_short_error(exc)})"
        self._warn(f"Energy will not be reported any more: {self._reason}.")

    def _disable_gpu(self, exc: BaseException | str) -> None:
        if self._gpu is not None:
            self._gpu.close()
        self._gpu = None
        text = exc if isinstance(exc, str) else _short_error(exc)
        self._gpu_reason = f"NVML failed for GPU {self.gpu_index} ({text})"
        self._warn(f"GPU energy will not be reported any more: {self._gpu_reason}.")

    @contextlib.contextmanager
    def measure(self, synchronize: Callable[[], None] | None = None) -> Iterator[Measurement]:
        """Time and meter the ``with`` block; ``m.reading`` is set on exit (also when the block raises).

        ``synchronize`` (e.g. ``torch.cuda.synchronize``) is called when the block ends, before the clock
        and the GPU energy counter are read, so that queued GPU work is inside the measurement.
        """
        if self._active:
            raise RuntimeError("EnergyMeter.measure() blocks cannot be nested")
        self._active = True
        measurement = Measurement()
        cc = self._cc
        if cc is not None:
            try:
                cc.start()
            except Exception as exc:
                self._disable_cpu(exc)
                cc = None
        gpu = self._gpu
        gpu_before: int | None = None
        if gpu is not None:
            try:
                gpu_before = gpu.read_mj()
            except Exception as exc:
                self._disable_gpu(exc)
                gpu = None
        t0 = time.perf_counter()
        try:
            yield measurement
        finally:
            if synchronize is not None:
                try:
                    synchronize()
                except Exception as exc:  # the block's own error (if any) is what the caller needs
                    self._warn(
                        f"could not synchronise the GPU before reading the meters: {_short_error(exc)}"
                    )
            seconds = time.perf_counter() - t0
            gpu_after: int | None = None
            if gpu is not None:
                try:
                    gpu_after = gpu.read_mj()
                except Exception as exc:
                    self._disable_gpu(exc)
            cpu_ram: tuple[float, float, float | None] | None = None
            if cc is not None:
                try:
                    cpu_ram = cc.stop()
                except Exception as exc:
                    self._disable_cpu(exc)
            self._active = False
            measurement.reading = self._reading(seconds, cc, cpu_ram, gpu_before, gpu_after)

    def _reading(
        self,
        seconds: float,
        cc: _CodeCarbonPart | None,
        cpu_ram: tuple[float, float, float | None] | None,
        gpu_before: int | None,
        gpu_after: int | None,
    ) -> EnergyReading:
        details: dict[str, Any] = {}
        parts: dict[str, str] = {}
        sources: list[str] = []
        total = 0.0

        if cc is not None and cpu_ram is not None:
            raw_cpu_j, raw_ram_j, tracker_seconds = cpu_ram
            parts.update(cc.parts)
            details.update(cc.static_details)
            # CodeCarbon's window also covers its own start/stop bookkeeping (~1-5 ms): bill the block with
            # the window's mean power x the block's duration.
            scale = 1.0
            if tracker_seconds and tracker_seconds > 0:
                scale = min(1.0, seconds / tracker_seconds)
            cpu_j, ram_j = raw_cpu_j * scale, raw_ram_j * scale
            details.update(cpu_joules=cpu_j, ram_joules=ram_j)
            if tracker_seconds and tracker_seconds > 0:
                details.update(
                    cpu_power_w=raw_cpu_j / tracker_seconds, ram_power_w=raw_ram_j / tracker_seconds
                )
            details.update(tracker_seconds=tracker_seconds, tracker_joules=raw_cpu_j + raw_ram_j)
            sources.append(cc.description)
            total += cpu_j + ram_j
        else:
            parts["cpu"] = parts["ram"] = UNAVAILABLE
            details["reason"] = self._reason or "CodeCarbon failed"

        if self.gpu_index is not None:
            gpu_ok = gpu_before is not None and gpu_after is not None and gpu_after >= gpu_before
            if gpu_ok and self._gpu is not None:
                gpu_j = (gpu_after - gpu_before) / 1000.0
                parts["gpu"] = MEASURED
                details["gpu_joules"] = gpu_j
                details["counters"] = " + ".join(
                    x for x in (details.get("counters"), "NVML GPU energy counter") if x
                )
                if seconds > 0:
                    details["gpu_power_w"] = gpu_j / seconds
                sources.append(self._gpu.description)
                total += gpu_j
            else:
                if gpu_before is not None and gpu_after is not None and gpu_after < gpu_before:
                    self._disable_gpu("energy counter went backwards (driver reloaded?)")
                parts["gpu"] = UNAVAILABLE
                details["gpu_reason"] = self._gpu_reason or "NVML failed"

        details["parts"] = parts
        if parts["cpu"] == UNAVAILABLE:
            # CPU + RAM is the base of every reading: a GPU-only figure would read as a total.
            source = self._reason or "unavailable"
            if "gpu_joules" in details:
                source += f"; GPU only: {self._gpu.description if self._gpu else 'nvml'}"
            return EnergyReading(None, UNAVAILABLE, source, seconds, details)
        measured_parts = [m for m in parts.values() if m != UNAVAILABLE]
        method = _combine_methods(measured_parts)
        source = " + ".join(sources)
        if parts.get("gpu") == UNAVAILABLE:
            source += "; GPU not measured"
        return EnergyReading(total, method, source, seconds, details)

    def close(self) -> None:
        """Release NVML and the tracker; later blocks are only timed."""
        if self._closed:
            return
        self._closed = True
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
            self._gpu_reason = "meter closed"
        if self._cc is not None:
            self._cc.abandon()
            self._cc = None
            self._reason = "meter closed"
