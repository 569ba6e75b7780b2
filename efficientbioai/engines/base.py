"""One small interface for every runtime: run a batch of tiles, say what precision it really used."""

from __future__ import annotations

import os
import statistics
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np


def default_threads() -> int:
    """All cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


class Engine(ABC):
    """Runs a network on batches of tiles.

    ``__call__`` takes float32 (B, C, [Z,] Y, X) and returns float32 (B, C_out, [Z,] Y, X), on the CPU
    as NumPy arrays. ``precision`` is what the runtime actually computes in, read back from it where the
    runtime can say (OpenVINO may silently substitute bf16 for fp16 on CPUs without fp16 units).
    """

    backend: str = ""
    precision: str = "fp32"
    threads: int | None = None
    label: str = ""  # how reports name this engine, e.g. "openvino int8"

    @abstractmethod
    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def map(self, batches: Iterable[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
        """Outputs of ``batches``, in order, with the engine kept busy.

        The engine runs in a worker thread (runtimes release the GIL) while the caller's thread reads the
        next batch from ``batches`` and consumes the previous output, so reading tiles and blending overlap
        with inference. At most ``depth`` batches are in flight.
        """
        with ThreadPoolExecutor(1, thread_name_prefix=f"{self.backend}-engine") as pool:
            pending: deque = deque()
            try:
                for batch in batches:
                    pending.append(pool.submit(self, batch))
                    if len(pending) >= depth:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release the runtime's resources (nothing to release by default)."""

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "threads": self.threads}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def median_latency_ms(fn, x: np.ndarray, *, warmup: int = 2, repeats: int = 10) -> dict[str, float]:
    """Median and spread of ``fn(x)`` wall time in milliseconds, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "repeats": repeats,
        "warmup": warmup,
    }


def latency_basis(latency: dict[str, Any], threads: int, what: str = "per tile") -> str:
    """What a latency figure (from :func:`median_latency_ms`) compares, in words, for every speed-up printed."""
    repeats = latency.get("repeats")
    warmup = latency.get("warmup", 2)
    runs = f"median of {repeats} runs after {warmup} warm-up" if repeats else "median after warm-up"
    return f"{what}, network only (no pre/post-processing), {runs}, {threads} thread{'s' if threads != 1 else ''}"
