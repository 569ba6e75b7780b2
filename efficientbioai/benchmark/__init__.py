"""``efficientbioai benchmark``: the original model against its compressed variants, on whole images.

One command builds every variant with ``compress``, times the original (PyTorch fp32 eager) and each
variant over whole images with the ``infer`` machinery on every available device, scores them against
the ground truth and against the original, and writes report.json, report.md and a self-contained
report.html with plots and image panels. See docs/benchmark.md.

Modules, in the order a run uses them:

* ``config``: the benchmark config (pydantic) and each variant's compress config;
* ``runner``: :func:`benchmark`, the run step by step;
* ``environment``: the machine (CPU, GPU, versions) and its load;
* ``images``: the output folder, the image list, default calibration images, loading one image;
* ``data`` / ``training``: generated images and targets; training the model on them;
* ``rows``: the rows (one model on one device) and which devices run;
* ``protocol`` / ``worker``: a row's own process, parent side and child side;
* ``scoring``: task metrics against the targets, agreement with the original;
* ``assemble``: report.json's content (statistics, ratios, notes);
* ``report``: writes report.json / report.md; ``formatting``: numbers as text; ``html``: report.html,
  with ``plots`` (SVG charts) and ``panels`` (image panels).
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
