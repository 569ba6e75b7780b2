"""``efficientbioai benchmark``: the original model against its compressed variants, on whole images.

One command builds every variant with ``compress``, times the original (PyTorch fp32 eager) and each
variant over whole images with the ``infer`` machinery on every available device, scores them against
the ground truth and against the original, and writes report.json, report.md and a self-contained
report.html with plots and image panels. See docs/benchmark.md.
"""

from __future__ import annotations

from efficientbioai.benchmark.config import BenchmarkConfig, check_benchmark_config, load_benchmark_config
from efficientbioai.benchmark.runner import BenchmarkResult, benchmark

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "benchmark",
    "check_benchmark_config",
    "load_benchmark_config",
]
