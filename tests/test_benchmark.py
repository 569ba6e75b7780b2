"""`efficientbioai benchmark` end to end: the real CLI in a subprocess builds real engines from a tiny 3D U-Net
trained on generated volumes, times every row in its own process, and writes the reports; the HTML report
is rendered by a real headless browser (Chromium) and the screenshot must show the plots.

One benchmark run (module fixture, ~30-40 s on 2 cores) serves every test here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from efficientbioai.config import CompressConfig

from .conftest import run_cli

PRUNE = "prune" in CompressConfig.model_fields  # pruning lands in compress separately
VARIANTS = ["fp32", "int8"] + (["prune50+int8"] if PRUNE else [])
REPEATS = 2
# plots.PALETTE[0], [1], [2]: the variants' colours in the charts
BAR_COLORS = {"fp32": (31, 119, 180), "int8": (255, 127, 14)} | (
    {"prune50+int8": (44, 160, 44)} if PRUNE else {}
)


def _config(root: Path) -> dict:
    variants = [
        {"name": "fp32", "quantize": {"precision": "fp32"}},
        {"name": "int8", "quantize": {"precision": "int8"}},
    ]
    if PRUNE:
        variants.append(
            {
                "name": "prune50+int8",
                "prune": {"ratio": 0.5, "round_to": 4, "finetune": {"steps": 4, "batch_size": 2}},
                "quantize": {"precision": "int8"},
            }
        )
    # a variant that cannot meet its fidelity limit: a failed row, the others still run
    variants.append(
        {"name": "strict", "quantize": {"precision": "int8"}, "fidelity": {"max_relative_l2": 1e-9}}
    )
    return {
        "title": "tiny 3D restoration",
        "model": {
            "kind": "monai",
            "name": "UNet",
            "axes": "bczyx",
            "kwargs": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 1,
                "channels": [4, 8, 16],
                "strides": [2, 2],
                "num_res_units": 1,
            },
        },
        "train": {"steps": 10, "batch_size": 2, "crop": [16, 32, 32], "images": 1},
        "images": {"generate": "nuclei", "shape": [16, 64, 64], "density": 3},
        "task": "restoration",
        "compress": {
            "calibration": {"num_tiles": 8, "tile_shape": [16, 32, 32]},
            "fidelity": {"num_tiles": 2},
            # a network trained 10 steps misses the default accuracy budget at int8: this test is about
            # the benchmark's machinery, so the budget is off (and the report must say so)
            "quantize": {"max_drop": None},
        },
        "variants": variants,
        "tiling": {"tile_shape": [16, 32, 32]},
        "runs": {"warmup": 1, "repeats": REPEATS},
        # one thread: on a shared 2-core machine, PyTorch's 2-thread OpenMP pool slows down by 10-50x
        # when other processes take a core (each barrier waits for a descheduled thread)
        "threads": 1,
        "panels": {"size": 64},
        "output": str(root / "bench"),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    (root / "b.yaml").write_text(yaml.safe_dump(_config(root), sort_keys=False))
    proc = run_cli("benchmark", "--config", "b.yaml", "--quiet", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "bench"
    return {
        "root": root,
        "out": out,
        "proc": proc,
        "report": json.loads((out / "report.json").read_text()),
    }


def test_report_holds_every_requested_row(run):
    report, out = run["report"], run["out"]
    ids = [r["id"] for r in report["rows"]]
    gpu = report["environment"]["gpu"]["available"]
    assert ids[: 2 + len(VARIANTS)] == ["original", *VARIANTS, "strict"]
    assert all(r["device"] == "cpu" for r in report["rows"][: 2 + len(VARIANTS)])
    strict = report["rows"][1 + len(VARIANTS)]
    assert strict["status"] == "failed" and "max_relative_l2" in strict["error"] and strict["latency"] is None
    assert any(n.startswith("strict: failed") for n in report["notes"])
    assert any("compressed with quantize.max_drop: null" in n for n in report["notes"])
    assert not (out / "artifacts" / "strict").exists()
    if gpu:
        assert "original@gpu" in ids
    else:  # no GPU: no GPU rows, and the report says why
        assert all(r["device"] == "cpu" for r in report["rows"])
        assert any(n.startswith("GPU: no CUDA device") for n in report["notes"])
    for r in (r for r in report["rows"] if r["id"] != "strict"):
        assert r["status"] == "ok", r["error"]
        assert len(r["latency"]["runs_s"]) == REPEATS
        assert r["latency"]["min_s"] <= r["latency"]["median_s"] <= r["latency"]["max_s"]
        assert r["throughput_mvoxel_s"] > 0
        assert r["memory"]["peak_rss_bytes"] > 30e6  # a whole Python process with its runtime
        assert r["memory"]["peak_rss_increase_bytes"] >= 0
        assert r["energy"]["method"] in ("measured", "estimated") and r["energy"]["joules_median"] > 0
        assert r["size"]["bytes"] > 0
        assert set(r["metrics"]["mean"]) == {"pearson", "psnr", "ssim"}
        assert r["engine"]["threads"] == report["settings"]["threads"]
        if r["variant"] is None:
            assert r["engine"]["backend"] == "torch" and r["ratios"]["speedup"] == pytest.approx(1.0)
        else:
            assert r["engine"]["backend"] == "openvino"
            assert r["ratios"]["speedup"] > 0 and r["ratios"]["energy"] > 0 and r["ratios"]["size"] > 0
            # quantized: close to the original; pruned (and fine-tuned for 4 steps only): some agreement
            floor = 0.0 if r["variant"].startswith("prune") else 0.9
            assert r["agreement"]["mean"]["pearson"] > floor, r["id"]
            assert (out / "artifacts" / r["variant"] / "manifest.yaml").is_file()
        assert (out / "outputs" / r["id"] / "nuclei3d_16x64x64_seed0.npy").is_file()
    rows = {r["id"]: r for r in report["rows"]}
    assert rows["fp32"]["agreement"]["mean"]["pearson"] > 0.9999  # same network, fp32 engine
    assert rows["int8"]["ratios"]["fp32_engine_row"] == "fp32"
    # an OpenVINO row's process holds no PyTorch: its memory is what deploying the engine costs
    assert rows["int8"]["memory"]["peak_rss_bytes"] < rows["original"]["memory"]["peak_rss_bytes"]
    assert rows["int8"]["ratios"]["memory"] > 1
    if PRUNE:
        p = rows["prune50+int8"]
        assert any(t.startswith("prune") for t in p["transformations"])
        assert p["size"]["parameters"] < rows["int8"]["size"]["parameters"]
    # the environment that decides int8 / bf16 speed
    cpu = report["environment"]["cpu"]
    assert {"AVX2", "AVX-512", "AVX-512 VNNI", "AVX-512 BF16", "AMX"} <= set(cpu["flags"])
    assert report["environment"]["versions"]["openvino"]
    assert report["images"][0]["shape"] == [1, 16, 64, 64] and report["images"][0]["target"]


def test_rows_were_interleaved_in_separate_processes(run):
    """Each row ran in its own process, and every repeat ran every row (rows interleaved, not batched)."""
    report = run["report"]
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    logs = sorted(p.stem for p in (run["out"] / "logs").glob("*.log"))
    assert logs == sorted(r["id"] for r in ok)
    for r in ok:
        assert r["setup_seconds"]["load"] > 0
    assert "interleaved" in report["settings"]["order"]


def test_report_json_validates_against_its_schema(run):
    jsonschema = pytest.importorskip("jsonschema")
    from efficientbioai.benchmark.report import load_schema

    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(run["report"], schema, cls=jsonschema.Draft202012Validator)
    # the schema has teeth: a row without its latency, or an unknown energy method, is rejected
    bad = json.loads(json.dumps(run["report"]))
    del bad["rows"][1]["latency"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)
    bad = json.loads(json.dumps(run["report"]))
    bad["rows"][0]["energy"]["method"] = "guessed"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)


def test_cli_prints_the_markdown_report(run):
    stdout, md = run["proc"].stdout, (run["out"] / "report.md").read_text()
    assert md.strip() in stdout
    assert "| row | device | engine | latency, median [IQR] | speed-up |" in md
    for rid in ["original", *VARIANTS]:
        assert re.search(rf"^\| {re.escape(rid)} \| cpu \| (torch|openvino) ", md, re.MULTILINE), rid
    assert "| strict | cpu | failed |" in md
    assert "energy: estimated" in md or "energy: measured" in md
    assert "report.html" in stdout


def test_html_report_is_self_contained(run):
    html = (run["out"] / "report.html").read_text()
    assert html.count("<svg") >= 3  # latency, energy, accuracy against speed
    assert 'id="latency-chart"' in html and 'id="energy-chart"' in html
    assert "Accuracy against speed" in html
    assert html.count('src="data:image/png;base64,') == 2 + 2 * len(VARIANTS)  # input, original, out + diff
    assert "z slice 8 of 16" in html  # 3D: the middle slice
    # nothing outside the file: no scripts, stylesheets, or images from anywhere else
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert not re.search(r"url\((?!data:)", html)


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _screenshot(browser: str, html: Path, png: Path, profile: Path, size=(1300, 640)) -> np.ndarray:
    from PIL import Image

    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        f"--screenshot={png}",
        html.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.is_file(), f"no screenshot ({proc.returncode}): {proc.stderr[-1500:]}"
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int32)


def _near(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).sum())


def test_html_report_screenshot_shows_the_plots(run, tmp_path):
    """Chromium renders report.html; the screenshot must show the bars and points in the variants' colours,
    which the same page without its plot section (rendered the same way) does not."""
    browser = _browser()
    if browser is None:
        if os.environ.get("EFFICIENTBIOAI_REQUIRE_BROWSER"):
            pytest.fail("EFFICIENTBIOAI_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium / chrome on this machine (CI installs Debian's chromium)")
    html = (run["out"] / "report.html").read_text()
    page = tmp_path / "report.html"
    page.write_text(html)
    control = tmp_path / "control.html"
    stripped, n = re.subn(r'<section id="plots".*?</section>', "", html, flags=re.DOTALL)
    assert n == 1
    control.write_text(stripped)

    shot = _screenshot(browser, page, tmp_path / "report.png", tmp_path / "profile1")
    blank = _screenshot(browser, control, tmp_path / "control.png", tmp_path / "profile2")
    assert shot.shape == blank.shape and shot.shape[0] >= 600
    assert shot.std() > 20  # not a blank page
    for name, rgb in BAR_COLORS.items():
        # each variant's bars in the latency and energy charts, and its point in the scatter plot
        # (a 1-pixel sliver of each bar and the point alone would be fewer; text is never these colours;
        # without the plots, at most the 10 × 10 swatch of the row in the results table has it)
        seen, without = _near(shot, rgb), _near(blank, rgb)
        assert without <= 100, f"{name}: colour {rgb} on {without} pixels without the plots"
        assert seen - without > 400, f"{name}: plot colour {rgb} on {seen} pixels only"
