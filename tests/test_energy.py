"""Tests of efficientbioai.energy: real CodeCarbon measurements (offline, CPU + RAM) and the NVML arithmetic.

The CodeCarbon tests measure this machine for real. The first meter in a process costs ~1.5 s (CodeCarbon's
hardware probe), so one meter is shared by the module; later meters reuse CodeCarbon's cache (~20 ms).
"""

from __future__ import annotations

import logging
import sys
import time
import types
import warnings

import numpy as np
import pytest

from efficientbioai.energy import EnergyMeter, EnergyReading, format_energy

RAPL_FILE = "/sys/class/powercap/intel-rapl:0/energy_uj"


def _rapl_readable() -> bool:
    try:
        with open(RAPL_FILE) as f:
            int(f.read().strip())
    except (OSError, ValueError):
        return False
    return True


def _busy(seconds: float) -> None:
    """Keep the CPU busy with NumPy for `seconds` of wall time."""
    a = np.random.default_rng(0).random((300, 300))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ a


@pytest.fixture(scope="module")
def meter():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a working CodeCarbon must not warn
        m = EnergyMeter()
    yield m
    m.close()


def test_real_measurement_of_busy_numpy_work(meter):
    with meter.measure() as m:
        _busy(0.5)
    r = m.reading
    assert isinstance(r, EnergyReading)
    assert r.joules is not None and r.joules > 0
    assert 0.5 <= r.seconds < 0.7
    assert r.source.startswith("codecarbon ")
    assert r.details["cpu_joules"] > 0 and r.details["ram_joules"] > 0
    assert r.joules == pytest.approx(r.details["cpu_joules"] + r.details["ram_joules"])
    # ~0.5 s at a few to a few hundred watts: catches kWh/J and window mistakes by orders of magnitude
    assert 0.5 < r.joules / r.seconds < 1000
    if _rapl_readable():
        # CPU from the RAPL counter; CodeCarbon's RAM is always a power model, so the total stays estimated
        assert r.details["parts"]["cpu"] == "measured"
        assert r.method in ("measured", "estimated")
    else:
        assert r.details["parts"] == {"cpu": "estimated", "ram": "estimated"}
        assert r.method == "estimated"


def test_consecutive_measurements_are_independent(meter):
    readings = []
    for seconds in (0.3, 0.6, 0.3):
        with meter.measure() as m:
            _busy(seconds)
        readings.append(m.reading)
    short1, long_, short2 = (r.joules for r in readings)
    assert long_ > 1.3 * short1  # twice the work, roughly twice the energy
    # cumulative totals would make the third reading the largest (1.2 s worth)
    assert short2 < 0.8 * long_
    assert 0.3 <= readings[2].seconds < 0.45


def test_empty_block_costs_almost_nothing(meter):
    t0 = time.perf_counter()
    with meter.measure() as m:
        pass
    overhead = time.perf_counter() - t0
    assert m.reading.joules is not None
    assert m.reading.seconds < 0.01
    # CodeCarbon's own start/stop bookkeeping (~3 ms, ~0.03 J of modelled RAM power) is not billed to the block
    assert m.reading.joules < 0.005
    assert overhead < 0.2


def test_block_exception_propagates_and_reading_is_kept(meter):
    with pytest.raises(ValueError, match="model failed"), meter.measure() as m:
        _busy(0.05)
        raise ValueError("model failed")
    assert m.reading is not None and m.reading.joules > 0
    # the tracker is still usable afterwards
    with meter.measure() as m2:
        _busy(0.05)
    assert m2.reading.joules > 0


def test_nested_measure_is_refused(meter):
    with meter.measure(), pytest.raises(RuntimeError, match="nested"), meter.measure():
        pass


def test_disabled_meter_only_times():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicitly disabled: no warning
        meter = EnergyMeter(enabled=False)
        with meter.measure() as m:
            time.sleep(0.05)
    r = m.reading
    assert r.joules is None
    assert r.method == "unavailable"
    assert 0.05 <= r.seconds < 0.2
    assert "disabled" in r.source
    assert format_energy(r) == "-"


def test_codecarbon_missing_warns_once_and_times(monkeypatch):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # makes `import codecarbon` raise ImportError
    with pytest.warns(RuntimeWarning, match="CodeCarbon unavailable"):
        meter = EnergyMeter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warning per block
        for _ in range(2):
            with meter.measure() as m:
                time.sleep(0.02)
    assert m.reading.joules is None
    assert m.reading.method == "unavailable"
    assert m.reading.seconds >= 0.02


def test_codecarbon_failing_mid_run_does_not_crash(monkeypatch):
    meter = EnergyMeter()
    tracker = meter._cc._tracker

    def broken_stop_task(*args, **kwargs):
        raise OSError("sensor vanished")

    monkeypatch.setattr(tracker, "stop_task", broken_stop_task)
    with pytest.warns(RuntimeWarning, match="sensor vanished"), meter.measure() as m:
        _busy(0.02)
    assert m.reading.method == "unavailable" and m.reading.joules is None
    assert m.reading.seconds >= 0.02
    with meter.measure() as m:  # later blocks: timed only, no crash
        pass
    assert m.reading.method == "unavailable"


def _fake_pynvml(counter_mj: list[int], calls: list[str]) -> types.ModuleType:
    """Stand-in for nvidia-ml-py's `pynvml`: there is no NVIDIA GPU on the machine these tests run on.

    nvmlDeviceGetTotalEnergyConsumption returns the values of `counter_mj` in turn (millijoules).
    """
    fake = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    fake.NVMLError = NVMLError
    fake.nvmlInit = lambda: calls.append("init")
    fake.nvmlShutdown = lambda: calls.append("shutdown")
    fake.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    fake.nvmlDeviceGetName = lambda handle: b"Fake H100"

    def energy(handle):
        assert handle == ("handle", 0)
        return counter_mj.pop(0)

    fake.nvmlDeviceGetTotalEnergyConsumption = energy
    return fake


def test_nvml_gpu_energy_is_counter_difference(meter, monkeypatch):
    """GPU path with a fake `pynvml` (stand-in: no NVIDIA GPU exists on this machine).

    Checks gpu joules = (after - before) / 1000 and how the part methods combine.
    """
    calls: list[str] = []
    # probe at construction, then before/after of two blocks
    counter = [5_000_000, 5_000_000, 5_250_500, 6_000_000, 6_001_000]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(counter, calls))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpu_meter = EnergyMeter(gpu_index=0)
    with gpu_meter.measure() as m:
        _busy(0.05)
    r = m.reading
    assert r.details["gpu_joules"] == pytest.approx(250.5)
    assert r.details["parts"]["gpu"] == "measured"
    assert r.joules == pytest.approx(r.details["cpu_joules"] + r.details["ram_joules"] + 250.5)
    assert "nvml GPU0 (Fake H100)" in r.source
    # CodeCarbon's RAM part is a power model (and CPU too without RAPL), so the reading is only estimated
    assert r.method == "estimated"

    # if CodeCarbon's parts were counters too, the reading would be measured
    monkeypatch.setattr(gpu_meter._cc, "parts", {"cpu": "measured", "ram": "measured"})
    with gpu_meter.measure() as m:
        pass
    assert m.reading.details["gpu_joules"] == pytest.approx(1.0)
    assert m.reading.method == "measured"

    assert not counter  # every counter value was read: one probe, then before/after each block
    gpu_meter.close()
    assert calls == ["init", "shutdown"]


def test_nvml_unavailable_warns_once_and_keeps_cpu(meter, monkeypatch):
    fake = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.warns(RuntimeWarning, match="GPU energy will not be reported.*Library Not Found"):
        gpu_meter = EnergyMeter(gpu_index=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gpu_meter.measure() as m:
            _busy(0.05)
    r = m.reading
    assert r.joules is not None and r.joules > 0
    assert r.details["parts"]["gpu"] == "unavailable"
    assert "gpu_joules" not in r.details
    assert r.method != "unavailable"
    assert "GPU not measured" in r.source


def test_format_energy():
    def reading(joules, method):
        return EnergyReading(joules=joules, method=method, source="x", seconds=1.0, details={})

    assert format_energy(reading(12.34, "estimated")) == "12.3 J (estimated)"
    assert format_energy(reading(0.0123, "measured")) == "12.3 mJ (measured)"
    assert format_energy(reading(456.7, "estimated")) == "457 J (estimated)"
    assert format_energy(reading(12345.0, "measured")) == "12.3 kJ (measured)"
    assert format_energy(reading(None, "unavailable")) == "-"
    assert format_energy(None) == "-"


def test_codecarbon_outputs_are_off(meter, tmp_path, monkeypatch):
    """No emissions.csv (nor any other output) even when CodeCarbon is asked to persist its data."""
    monkeypatch.chdir(tmp_path)
    m = EnergyMeter()
    with m.measure():
        _busy(0.02)
    m._cc._tracker.flush()  # what CodeCarbon calls to write its outputs
    m.close()
    assert list(tmp_path.iterdir()) == []


def test_codecarbon_logger_is_quiet(meter):
    """CodeCarbon logs INFO/WARNING lines to stderr from its constructor unless told otherwise."""
    records: list[logging.LogRecord] = []

    class Recorder(logging.Handler):
        def emit(self, record):
            records.append(record)

    cc_logger = logging.getLogger("codecarbon")  # propagate=False: only its own handlers see the records
    recorder = Recorder()
    cc_logger.addHandler(recorder)
    cc_logger.setLevel(logging.INFO)  # as right after `import codecarbon`
    try:
        m = EnergyMeter()
        with m.measure():
            _busy(0.02)
        m.close()
    finally:
        cc_logger.removeHandler(recorder)
    assert [f"{r.levelname}: {r.getMessage()}" for r in records] == []


# ------------------------------------------------------------------------ honest labels (RAPL, estimates)


def _fake_powercap(root, package_uj: int, dram_uj: int | None = None, wrap: int = 10**12):
    """A powercap tree laid out as the kernel's: this machine has no RAPL, so the files are written here."""
    pkg = root / "intel-rapl:0"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "name").write_text("package-0\n")
    (pkg / "energy_uj").write_text(f"{package_uj}\n")
    (pkg / "max_energy_range_uj").write_text(f"{wrap}\n")
    core = root / "intel-rapl:0:0"  # a sub-domain that must not be counted twice
    core.mkdir(exist_ok=True)
    (core / "name").write_text("core\n")
    (core / "energy_uj").write_text("5\n")
    if dram_uj is not None:
        dram = root / "intel-rapl:0:1"
        dram.mkdir(exist_ok=True)
        (dram / "name").write_text("dram\n")
        (dram / "energy_uj").write_text(f"{dram_uj}\n")
        (dram / "max_energy_range_uj").write_text(f"{wrap}\n")
    return root


def test_rapl_counters_are_read_directly_and_labelled_measured(tmp_path):
    from efficientbioai.energy import energy_basis, energy_summary

    root = _fake_powercap(tmp_path / "powercap", package_uj=1_000_000, dram_uj=50_000)
    meter = EnergyMeter(rapl_root=root)
    with meter.measure() as m:
        # the kernel's counters advance while the block runs: 2.5 J package, 0.25 J DRAM
        (root / "intel-rapl:0" / "energy_uj").write_text("3500000\n")
        (root / "intel-rapl:0:1" / "energy_uj").write_text("300000\n")
    r = m.reading
    assert r.method == "measured" and r.joules == pytest.approx(2.75)
    assert r.details["cpu_joules"] == pytest.approx(2.5) and r.details["ram_joules"] == pytest.approx(0.25)
    assert r.source.startswith("rapl counters (package-0 + dram-0")
    assert energy_basis(r.method, r.details).startswith("measured (RAPL package-0 + dram-0, package-wide")
    assert "estimated" not in energy_summary([r])
    meter.close()


def test_rapl_counter_wraparound_and_missing_dram(tmp_path):
    root = _fake_powercap(tmp_path / "powercap", package_uj=999_000, wrap=1_000_000)
    meter = EnergyMeter(rapl_root=root)
    with meter.measure() as m:
        (root / "intel-rapl:0" / "energy_uj").write_text("1000\n")  # wrapped: 1000 + 1e6 - 999000 µJ
    assert m.reading.joules == pytest.approx(0.002)
    assert "RAM not included" in m.reading.details["counters"]
    meter.close()


def test_unreadable_rapl_falls_back_to_an_estimate_and_says_how_to_fix_it(tmp_path, monkeypatch):
    from efficientbioai import energy

    root = _fake_powercap(tmp_path / "powercap", package_uj=1)

    def denied(self):
        raise PermissionError("root only")

    monkeypatch.setattr(energy.RaplPart, "_read", denied)
    with pytest.warns(RuntimeWarning, match="readable by root only"):
        meter = EnergyMeter(rapl_root=root)
    assert "chmod a+r" in meter.rapl_note
    with meter.measure() as m:
        _busy(0.1)
    assert m.reading.method == "estimated" and m.reading.source.startswith("codecarbon ")
    meter.close()


def test_codecarbon_estimate_is_named_cpu_time_times_an_assumed_power(meter):
    """On this machine (no RAPL) CodeCarbon models the CPU: every text must say so, ratios included."""
    from efficientbioai.energy import energy_basis, energy_ratio_text, energy_summary, is_cpu_time_estimate

    with meter.measure() as m:
        _busy(0.1)
    r = m.reading
    if _rapl_readable():  # pragma: no cover - a machine with readable RAPL measures instead
        pytest.skip("this machine has readable RAPL counters: covered by the RAPL tests")
    assert r.method == "estimated" and r.details["cpu_mode"] == "cpu_load"
    assert is_cpu_time_estimate(r.method, r.details)
    basis = energy_basis(r.method, r.details)
    assert basis.startswith("estimated from CPU time × an assumed power (")
    assert f"{r.details['tdp_w']:g} W" in basis and "not measured" in basis
    summary = energy_summary([r])
    assert "estimated from CPU time × an assumed power" in summary and "model" in summary
    ratio = energy_ratio_text(3.2, r.method, r.details)
    assert ratio.startswith("uses 3.20x less energy (estimated from CPU time × an assumed power")
    assert "not a measured saving" in ratio
    # a measured figure (RAPL, NVML) is labelled measured and carries no such caveat
    measured = energy_ratio_text(2.0, "measured", {"counters": "RAPL package-0, package-wide"})
    assert measured == "uses 2.00x less energy (measured (RAPL package-0, package-wide))"
    assert energy_basis("unavailable", {}) == "unavailable"
