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

from efficientbioai.energy.meter import EnergyMeter
from efficientbioai.energy.readings import (
    CPU_TIME_ESTIMATE,
    ESTIMATED,
    GPU_LABEL,
    MEASURED,
    UNAVAILABLE,
    EnergyReading,
    Measurement,
    energy_basis,
    energy_ratio_text,
    energy_summary,
    format_energy,
    is_cpu_time_estimate,
)
from efficientbioai.energy.sources import RAPL_ROOT, CodeCarbonPart, NvmlPart, RaplPart

__all__ = [
    "CPU_TIME_ESTIMATE",
    "ESTIMATED",
    "GPU_LABEL",
    "MEASURED",
    "RAPL_ROOT",
    "UNAVAILABLE",
    "CodeCarbonPart",
    "EnergyMeter",
    "EnergyReading",
    "Measurement",
    "NvmlPart",
    "RaplPart",
    "energy_basis",
    "energy_ratio_text",
    "energy_summary",
    "format_energy",
    "is_cpu_time_estimate",
]
