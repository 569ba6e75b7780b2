"""Where energy figures come from: CodeCarbon (CPU + RAM, measured or modelled), RAPL counters read
directly from ``/sys/class/powercap``, and NVML's GPU energy counter. See :mod:`efficientbioai.energy`."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
from pathlib import Path
from typing import Any

from efficientbioai.energy.readings import (
    ESTIMATED,
    KWH_TO_J,
    MEASURED,
    MEASURED_CPU_MODES,
    MEASURED_HARDWARE_CLASSES,
    TRACKING_MODE,
)


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CodeCarbonPart:
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
                cpu_method = MEASURED if mode in MEASURED_CPU_MODES else ESTIMATED
                cpu_text = f"{mode or 'unknown'} mode: {model}"
                if cpu_method == ESTIMATED and tdp is not None:
                    generic = " generic" if getattr(hw, "_is_generic_tdp", False) else ""
                    cpu_text += f", TDP {tdp:g} W{generic}"
                    details["tdp_w"] = tdp
                    details["tdp_generic"] = bool(generic)
                details["cpu_mode"] = mode
            elif kind in MEASURED_HARDWARE_CLASSES and chip_part in ("CPU", "RAM"):
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


class RaplPart:
    """CPU package (and DRAM) energy from the kernel's RAPL counters, read directly from powercap.

    The ``intel-rapl`` powercap driver also serves AMD Zen CPUs. Package domains are ``intel-rapl:N``
    (name ``package-N``); a DRAM sub-domain ``intel-rapl:N:M`` (name ``dram``) is used when present.
    Counters are microjoules that wrap at ``max_energy_range_uj``. They are package-wide: everything
    that ran on the package meanwhile is included. Same interface as :class:`CodeCarbonPart`.
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


class NvmlPart:
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
