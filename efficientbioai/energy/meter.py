"""``EnergyMeter``: times blocks of work and reads every available energy source around them."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from efficientbioai.energy.readings import MEASURED, UNAVAILABLE, EnergyReading, Measurement, combine_methods
from efficientbioai.energy.sources import RAPL_ROOT, CodeCarbonPart, NvmlPart, RaplPart, short_error


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
        self._cc: CodeCarbonPart | RaplPart | None = None
        self.rapl_note: str | None = None  # why RAPL counters were not used (when they exist)
        self._gpu: NvmlPart | None = None
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
                self._cc = RaplPart(rapl_root)
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
                self._cc = CodeCarbonPart(country_iso_code)
            except Exception as exc:  # ImportError, or anything CodeCarbon raises on this machine
                self._reason = f"CodeCarbon unavailable ({short_error(exc)})"
                self._warn(f"Energy will not be reported: {self._reason}.")
        if gpu_index is not None:
            try:
                self._gpu = NvmlPart(gpu_index)
            except Exception as exc:
                self._gpu_reason = f"NVML unavailable for GPU {gpu_index} ({short_error(exc)})"
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
        self._reason = f"CodeCarbon failed ({short_error(exc)})"
        self._warn(f"Energy will not be reported any more: {self._reason}.")

    def _disable_gpu(self, exc: BaseException | str) -> None:
        if self._gpu is not None:
            self._gpu.close()
        self._gpu = None
        text = exc if isinstance(exc, str) else short_error(exc)
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
                    self._warn(f"could not synchronise the GPU before reading the meters: {short_error(exc)}")
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
        cc: CodeCarbonPart | None,
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
        method = combine_methods(measured_parts)
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
