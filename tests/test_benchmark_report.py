"""Benchmark report pieces without engines: statistics and ratios, JSON schema, Markdown / HTML rendering,
SVG charts and image panels (2D and a slice of 3D)."""

from __future__ import annotations

import base64
import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from efficientbioai.benchmark import environment, plots
from efficientbioai.benchmark.assemble import build_report
from efficientbioai.benchmark.config import check_benchmark_config
from efficientbioai.benchmark.html import render_html
from efficientbioai.benchmark.images import ImageEntry
from efficientbioai.benchmark.panels import image_panels
from efficientbioai.benchmark.report import finite, load_schema, render_markdown
from efficientbioai.benchmark.rows import Row

from .manifests import manifest_stub

SVG = "{http://www.w3.org/2000/svg}"


def _runs(seconds: list[float], joules: float | None = 1.0, peak=500e6) -> list[dict]:
    return [
        {
            "repeat": k,
            "image": 0,
            "wall": s + 0.001,
            "other_cpu": 0.0,
            "seconds": s,
            "tiles": 4,
            "skipped": 0,
            "cpu_seconds": s * 2,
            "rss_before": int(peak - 10e6),
            "peak_rss": int(peak),
            "gpu_peak_bytes": None,
            "energy": None
            if joules is None
            else {
                "joules": joules * s,
                "method": "estimated",
                "source": "codecarbon test",
                "details": {"cpu_mode": "cpu_load", "tdp_w": 8.0},  # what CodeCarbon does on this machine
            },
        }
        for k, s in enumerate(seconds)
    ]


def _manifest(precision: str, compressed_bytes: int, steps=()):
    return manifest_stub(
        model={"name": "TinyNet"},
        input={"axes": "bcyx", "channels": 1},
        precision=precision,
        transformations=[{"step": "export_onnx"}, *steps],
        size={"parameters": 1000, "original_bytes": 4000, "compressed_bytes": compressed_bytes},
        fidelity={"pearson": 0.999},
    )


def _ready(label: str, backend: str, precision: str) -> dict:
    return {
        "label": label,
        "backend": backend,
        "precision": precision,
        "threads": 2,
        "load_seconds": 1.0,
        "warmup_seconds": 0.5,
        "rss_after_setup": int(490e6),
        "memory_method": "test method",
    }


@pytest.fixture
def report() -> dict:
    cfg = check_benchmark_config(
        {
            "model": {"kind": "monai", "name": "UNet", "axes": "bcyx", "kwargs": {}},
            "images": {"path": "x.tif", "targets": "y.tif"},
            "task": "semantic",
            "variants": [
                {"name": "fp32", "quantize": {"precision": "fp32"}},
                {"name": "int8"},
                {"name": "bad"},
            ],
            "output": "runs/b",
        }
    )
    m8 = _manifest("int8", 1000, [{"step": "quantize_int8", "tool": "nncf", "preset": "performance"}])
    m32 = _manifest("fp32", 8000)
    rows = [
        Row(
            "original",
            None,
            "cpu",
            "original",
            manifest=m32,
            ready=_ready("torch fp32", "torch", "fp32"),
            runs=_runs([0.4, 0.5, 0.6]),
        ),
        Row(
            "fp32",
            "fp32",
            "cpu",
            "variant",
            manifest=m32,
            ready=_ready("openvino fp32", "openvino", "fp32"),
            runs=_runs([0.2, 0.25, 0.3]),
        ),
        Row(
            "int8",
            "int8",
            "cpu",
            "variant",
            manifest=m8,
            ready=_ready("openvino int8", "openvino", "fp32"),
            runs=_runs([0.1, 0.12, 0.2], joules=0.5, peak=400e6),
        ),
        Row("bad", "bad", "cpu", "variant", status="failed", error="compress: Pearson drop 0.1 > 0.01"),
    ]
    scores = {
        "original": {
            "metrics": {"mean": {"dice": 0.9, "iou": 0.82}, "per_image": [{"dice": 0.9, "iou": 0.82}]},
            "agreement": {"mean": {}, "per_image": [{}]},
        },
        "fp32": {
            "metrics": {"mean": {"dice": 0.9, "iou": 0.82}, "per_image": [{"dice": 0.9, "iou": 0.82}]},
            "agreement": {"mean": {"pearson": 1.0, "mask_dice": 1.0}, "per_image": [{}]},
        },
        "int8": {
            "metrics": {"mean": {"dice": 0.89, "iou": float("nan")}, "per_image": [{"dice": 0.89}]},
            "agreement": {"mean": {"pearson": 0.998, "mask_dice": 0.99}, "per_image": [{}]},
        },
    }
    images = [ImageEntry("x", Path("x.tif"), None, 0, Path("y.tif"), False, (1, 100, 200))]
    env = environment.probe(2)
    return finite(
        build_report(
            cfg,
            cfg.tiling.model_dump(mode="json"),
            env,
            ["cpu"],
            images,
            rows,
            scores,
            ["GPU: none"],
            2,
            "2026-01-01T00:00:00+00:00",
            {"total": 10.0, "prepare": 1.0, "compress": 3.0, "timing": 5.0},
        )
    )


def test_statistics_and_ratios(report):
    rows = {r["id"]: r for r in report["rows"]}
    assert rows["original"]["latency"]["median_s"] == pytest.approx(0.5)
    assert rows["original"]["latency"]["q1_s"] == pytest.approx(0.45)
    assert rows["int8"]["ratios"]["speedup"] == pytest.approx(0.5 / 0.12)
    assert rows["int8"]["ratios"]["energy"] == pytest.approx(0.5 / (0.5 * 0.12))
    assert rows["int8"]["ratios"]["size"] == pytest.approx(4.0)  # 4000 B original vs 1000 B engine
    assert rows["fp32"]["ratios"]["size"] == pytest.approx(0.5)  # engines can be larger than the original
    assert rows["int8"]["ratios"]["speedup_vs_fp32_engine"] == pytest.approx(0.25 / 0.12)
    assert rows["int8"]["memory"]["peak_rss_increase_bytes"] == 10e6
    assert rows["int8"]["throughput_mvoxel_s"] == pytest.approx(20000 / 0.12 / 1e6)
    assert rows["int8"]["transformations"] == ["int8 (nncf, performance preset)"]
    assert rows["bad"]["status"] == "failed" and rows["bad"]["latency"] is None
    assert rows["int8"]["metrics"]["mean"]["iou"] is None  # NaN is not JSON: null
    assert report["primary_metric"] == "dice"
    energy_note = next(n for n in report["notes"] if n.startswith("energy: "))
    assert energy_note.startswith("energy: estimated from CPU time × an assumed power (8 W")
    assert "ratios here are close to the ratios of CPU times, not measured savings" in energy_note
    assert rows["int8"]["energy"]["cpu_time_estimate"] is True
    assert any("bad: failed" in n for n in report["notes"])


def test_report_validates_and_serialises(report):
    jsonschema = pytest.importorskip("jsonschema")
    text = json.dumps(report, allow_nan=False)
    jsonschema.validate(json.loads(text), load_schema(), cls=jsonschema.Draft202012Validator)


def test_markdown_report(report):
    md = render_markdown(report)
    assert md.startswith("# TinyNet: original vs compressed")
    assert "| int8 | cpu | openvino int8 | 120 ms [110.0–160.0] | 4.17× |" in md
    assert "2.00× larger" in md and "4.00× smaller" in md  # fp32 engine file vs original weights
    assert "| bad | cpu | failed |" in md
    assert (
        "int8: 4.17× faster, 2.08× faster than fp32, 8.33× less energy (estimated from CPU time × an "
        "assumed power, not measured), 4.00× smaller, "
        "Dice 0.8900 (original 0.9000, -0.0100)" in md
    )
    assert "TinyNet · task semantic · 1 image(s) (100 × 200)" in md


def test_html_report_has_charts_table_and_notes(report):
    html = render_html(report)
    assert html.startswith("<!DOCTYPE html>") and "</html>" in html
    assert html.count("<svg") == 3
    assert '<tr class="failed">' in html
    assert "Dice vs ground truth" in html  # the accuracy axis names the metric
    assert "<script" not in html


def test_bar_chart_bars_are_proportional():
    bars = [plots.Bar("a", 2.0, "#111111"), plots.Bar("b", 1.0, "#222222", 0.8, 1.2, note="2× faster")]
    svg = ET.fromstring(plots.bar_chart("t", bars, "s", element_id="c"))
    rects = [r for r in svg.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert [r.get("fill") for r in rects] == ["#111111", "#222222"]
    w = [float(r.get("width")) for r in rects]
    assert w[0] == pytest.approx(2 * w[1], rel=0.01)
    assert svg.get("id") == "c" and "2× faster" in "".join(svg.itertext())


def test_scatter_places_points():
    svg = ET.fromstring(
        plots.scatter("t", [plots.Point("a", 1.0, 0.9, "#000"), plots.Point("b", 3.0, 0.8, "#111")], "x", "y")
    )
    c = list(svg.iter(f"{SVG}circle"))
    assert len(c) == 2
    assert float(c[1].get("cx")) > float(c[0].get("cx")) and float(c[1].get("cy")) > float(c[0].get("cy"))
    assert plots.nice_ticks(0, 0.87) == [0, 0.2, 0.4, 0.6, 0.8]


def _decode(uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def test_panels_2d():
    rng = np.random.default_rng(0)
    image = rng.random((1, 100, 300)).astype(np.float32)
    original = image.copy()
    variant = original.copy()
    variant[0, 10:20, 10:20] += 0.5  # a local difference
    where, inp, orig, rows = image_panels(image, original, {"int8": variant, "fp32": original}, 2, size=150)
    assert where == "whole image"
    assert _decode(inp.uri).shape == (50, 150, 3) and (inp.width, inp.height) == (150, 50)
    diff = _decode(rows[0].panels[1].uri).astype(int)
    red = (diff[..., 0] > 150) & (diff[..., 2] < 120)
    assert red[5:10, 5:10].all() and not red[30:, 30:].any()  # red where the variant is higher, only there
    same = _decode(rows[1].panels[1].uri)
    assert (np.abs(same.astype(int) - 247) <= 2).all()  # identical output: a white difference map


def test_panels_3d_show_the_middle_slice():
    vol = np.zeros((1, 9, 40, 40), np.float32)
    vol[0, 4, 10:30, 10:30] = 1.0  # only the middle slice has the square
    vol[0, 0] = 0.5
    where, inp, _, _ = image_panels(vol, vol, {"v": vol}, 3)
    assert where == "z slice 4 of 9"
    px = _decode(inp.uri)[..., 0]
    assert px[20, 20] == 255 and px[2, 2] == 0
    where, inp, _, _ = image_panels(vol, vol, {"v": vol}, 3, z=0)
    assert where == "z slice 0 of 9"
