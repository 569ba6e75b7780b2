"""One benchmark row in its own process: ``python -m efficientbioai.benchmark.worker``.

Each row (the original model, or one compressed variant, on one device) lives in its own process for the
whole benchmark, so that its peak memory is its own (the kernel's RSS high-water mark of the process,
reset before each run) and no runtime's thread pool or allocator cache affects another row. The parent
starts every row, then asks them one at a time to run one image (rows interleaved), so at most one row
computes at any moment.

Protocol (one JSON object per line): the parent writes the row's spec, then commands ``{"cmd": "run",
"image": i}`` and finally ``{"cmd": "exit"}`` on the worker's stdin; the worker answers each with one
line on stdout starting with :data:`MARK` (anything else a library prints is ignored). The parent side
is :mod:`efficientbioai.benchmark.protocol`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

MARK = "@@EFFICIENTBIOAI-BENCHMARK@@ "


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    with contextlib.suppress(Exception):
        import psutil

        return int(psutil.Process().memory_info().rss)
    return None


class PeakRSS:
    """Peak resident memory of this process during a block.

    Linux: the kernel's high-water mark (VmHWM), reset to the current RSS before the block by writing 5
    to /proc/self/clear_refs — exact, whatever allocates (NumPy, PyTorch, OpenVINO's native code).
    Elsewhere: the RSS sampled every 5 ms by a thread (can miss short spikes).
    """

    def __init__(self) -> None:
        self.method = "sampled"
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if _status_kib("VmHWM") is not None:
                self.method = "kernel"
        except OSError:
            pass
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def description(self) -> str:
        if self.method == "kernel":
            return "VmHWM of the row's own process, reset before each run via /proc/self/clear_refs"
        return "RSS of the row's own process sampled every 5 ms (psutil)"

    def __enter__(self) -> PeakRSS:
        if self.method == "kernel":
            Path("/proc/self/clear_refs").write_text("5")
        else:
            self._peak = rss_bytes() or 0
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def peak(self) -> int | None:
        if self.method == "kernel":
            kib = _status_kib("VmHWM")
            return kib * 1024 if kib is not None else None
        return max(self._peak, rss_bytes() or 0)


# ------------------------------------------------------------------------------------------ engines


def build_engine(spec: dict[str, Any], threads: int):
    from efficientbioai.artifact import Artifact
    from efficientbioai.engines import TorchEngine
    from efficientbioai.engines.cuda import TorchCudaEngine
    from efficientbioai.errors import EfficientBioAIError

    artifact = Artifact(spec["artifact"])
    manifest = artifact.manifest
    if spec["device"] == "cpu":
        if spec["kind"] == "original":
            engine = artifact.open_original(threads)
            engine.label = (
                f"{engine.backend} fp32 eager (original)"
                if engine.backend == "torch"
                else (f"{engine.backend} fp32 (original)")
            )
        else:
            engine = artifact.open_engine(None, threads)
        return engine, manifest
    original = artifact.open_original(threads)
    if not isinstance(original, TorchEngine):
        raise EfficientBioAIError(
            "the original model exists only as ONNX: it has no PyTorch module to run on the GPU",
            "benchmark it on the CPU (devices: [cpu])",
        )
    engine = TorchCudaEngine(
        original.module,
        spec.get("precision", "fp32"),
        spec.get("gpu_index", 0),
        channels_last=spec["kind"] != "original",  # the original row is what users run today
    )
    if spec["kind"] == "original":
        engine.label = "torch cuda fp32 eager (original)"
    return engine, manifest


# --------------------------------------------------------------------------------------------- main


def serve(spec: dict[str, Any]) -> None:
    import os

    from efficientbioai.benchmark.images import load_image
    from efficientbioai.config import TilingConfig
    from efficientbioai.energy import EnergyMeter
    from efficientbioai.infer.gpu import nvml_index
    from efficientbioai.infer.predict import Predictor

    t_start = time.perf_counter()
    threads = int(spec["threads"])
    torch = None
    if spec["kind"] == "original" or spec["device"] == "gpu":
        # only rows that run PyTorch import it: an OpenVINO row's memory is then what deploying it costs
        import torch

        torch.set_num_threads(threads)
    engine, manifest = build_engine(spec, threads)
    predictor = Predictor.from_artifact(manifest, engine, TilingConfig.model_validate(spec["tiling"]))
    model_axes = manifest.input.axes
    images = [load_image(e, model_axes) for e in spec["images"]]
    cuda = spec["device"] == "gpu"
    sync = getattr(engine, "synchronize", None) or (lambda: None)
    gpu_index = nvml_index(int(spec.get("gpu_index", 0))) if cuda else None
    meter = EnergyMeter(enabled=bool(spec["energy"]), gpu_index=gpu_index)
    outputs = Path(spec["outputs"])
    outputs.mkdir(parents=True, exist_ok=True)
    saved: set[int] = set()

    def save(i: int, output: np.ndarray) -> None:
        if i not in saved:
            np.save(outputs / f"{spec['images'][i]['name']}.npy", output.astype(np.float32, copy=False))
            saved.add(i)

    load_seconds = time.perf_counter() - t_start
    warm = time.perf_counter()
    predictor.warm_up(images[0].shape[0])
    for _ in range(int(spec["warmup"])):
        for i, image in enumerate(images):
            save(i, predictor(image).output)
    sync()
    peak = PeakRSS()
    _reply(
        {
            "ready": True,
            "label": engine.label,
            "backend": engine.backend,
            "precision": engine.precision,
            "threads": getattr(engine, "threads", None),
            "load_seconds": load_seconds,
            "warmup_seconds": time.perf_counter() - warm,
            "rss_after_setup": rss_bytes(),
            "memory_method": peak.description,
            "pid": os.getpid(),
        }
    )
    from efficientbioai.benchmark.environment import own_cpu_seconds

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "exit":
            break
        i = int(cmd["image"])
        image = images[i]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss_before = rss_bytes()
        cpu0 = own_cpu_seconds()
        with peak, meter.measure() as m:
            t0 = time.perf_counter()
            pred = predictor(image)
            sync()
            seconds = time.perf_counter() - t0
        cpu = own_cpu_seconds() - cpu0
        reading = m.reading.to_dict() if m.reading is not None else None
        save(i, pred.output)
        _reply(
            {
                "seconds": seconds,
                "tiles": pred.tiles,
                "skipped": pred.skipped,
                "cpu_seconds": cpu,
                "rss_before": rss_before,
                "peak_rss": peak.peak,
                "gpu_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
                "energy": reading,
            }
        )
    engine.close()
    meter.close()


def main() -> int:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("nncf").setLevel(logging.ERROR)
    try:
        spec = json.loads(sys.stdin.readline())
        serve(spec)
    except Exception as exc:
        _reply(
            {
                "error": getattr(exc, "problem", None) or f"{type(exc).__name__}: {exc}",
                "fix": getattr(exc, "fix", None),
                "traceback": traceback.format_exc(),
            }
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
