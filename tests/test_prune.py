"""Structured pruning, fine-tuning and compression within an accuracy budget.

Real Torch-Pruning on real MONAI networks, real NNCF (plain and accuracy-controlled), real OpenVINO and
ONNX Runtime engines, the real CLI in subprocesses. Weights are random or briefly trained in the test.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from torch import nn

from efficientbioai.artifact import read_manifest
from efficientbioai.compress import compress
from efficientbioai.compress import prune as prune_mod
from efficientbioai.compress.export import export_onnx, to_openvino
from efficientbioai.compress.prune import count_parameters, fine_tune, prune
from efficientbioai.config import FineTuneConfig, PruneConfig, validate_config
from efficientbioai.engines import OnnxRuntimeEngine, OpenVINOEngine
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.metrics import relative_l2

from .conftest import REPO, blobs, run_cli, tiny_unet


def monai_net(name: str, ndim: int):
    from monai.networks.nets import BasicUNet, DynUNet, UNet

    torch.manual_seed(0)
    if name == "UNet":
        return UNet(ndim, 1, 2, channels=(16, 32, 64), strides=(2, 2), num_res_units=2).eval()
    if name == "BasicUNet":
        return BasicUNet(ndim, 1, 2, features=(16, 16, 32, 32, 64, 16)).eval()
    return DynUNet(
        ndim, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[16, 32, 64],
        res_block=True,
    ).eval()  # fmt: skip


def example(ndim: int) -> np.ndarray:
    shape = (32, 32, 32) if ndim == 3 else (64, 64)
    return np.random.default_rng(0).random((1, 1, *shape), dtype=np.float32)


# ------------------------------------------------------------------------------- Torch-Pruning fixes


def test_upstream_torch_pruning_breaks_on_shared_slope_prelu():
    """Why our PReLU pruner exists: Torch-Pruning alone cannot build the graph of a MONAI UNet (torch 2.13).

    If this starts to pass, Torch-Pruning has fixed it and our work-around can be dropped.
    """
    import torch_pruning as tp

    net = monai_net("UNet", 2)
    with pytest.raises(TypeError, match="NoneType"):
        tp.pruner.MetaPruner(
            net,
            torch.from_numpy(example(2)),
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
        )


def test_shared_slope_prelu_fix_is_what_makes_monai_unet_prunable(monkeypatch):
    net = monai_net("UNet", 2)
    pruned, report = prune(net, example(2), PruneConfig(), 0.5)
    assert report.params_after < 0.35 * report.params_before
    # the same call with the fix switched off fails in Torch-Pruning's concat mapping
    monkeypatch.setattr(prune_mod, "_record_prelu_channels", lambda m: contextlib.nullcontext())
    with pytest.raises(EfficientBioAIError, match="could not restructure.*NoneType"):
        prune(net, example(2), PruneConfig(), 0.5)


def test_affine_instance_norm_fix_is_what_makes_basicunet_prunable(monkeypatch):
    net = monai_net("BasicUNet", 2)
    prune(net, example(2), PruneConfig(), 0.5)
    monkeypatch.setattr(prune_mod, "_traceable_instance_norm", lambda m: contextlib.nullcontext())
    with pytest.raises(EfficientBioAIError, match="could not restructure"):
        prune(net, example(2), PruneConfig(), 0.5)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ["UNet", "BasicUNet", "DynUNet"])
def test_monai_networks_get_physically_smaller_and_still_run_everywhere(name, ndim, tmp_path):
    net = monai_net(name, ndim)
    x = example(ndim)
    pruned, report = prune(net, x, PruneConfig(method="l2", round_to=8), 0.5)
    assert report.params_before == count_parameters(net)  # the original is left untouched
    assert report.params_after == count_parameters(pruned) < 0.35 * report.params_before
    convs = [m for m in pruned.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    out_layer = dict(pruned.named_modules())[report.ignored[0]]
    assert out_layer.out_channels == 2  # the output layer is left alone
    # channel counts stay multiples of round_to, except where they are tied to the 2 output channels
    assert all(c.out_channels % 8 == 0 or c.out_channels == 2 for c in convs)
    assert sum(c.out_channels % 8 == 0 for c in convs) >= len(convs) - 2
    with torch.no_grad():
        ref = pruned(torch.from_numpy(x)).numpy()
    assert ref.shape == (1, 2, *x.shape[2:])
    # exports and runs on ONNX Runtime and OpenVINO (fp32 and bf16) like any network
    onnx_path = export_onnx(pruned, x, tmp_path / "m.onnx", "bczyx" if ndim == 3 else "bcyx")
    with OnnxRuntimeEngine(onnx_path, 2) as ort:
        assert relative_l2(ort(x), ref) < 1e-3
    import openvino as ov

    ov.save_model(to_openvino(onnx_path), str(tmp_path / "m.xml"))
    with OpenVINOEngine(tmp_path / "m.xml", "fp32", 2) as eng:
        assert relative_l2(eng(x), ref) < 1e-3


def test_fpgm_and_per_layer_ratios_and_ignored_layers():
    net = monai_net("UNet", 2)
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    first = names[0]
    cfg = PruneConfig(method="fpgm", layer_ratios={".*model\\.1\\..*": 0.75}, ignore=[first])
    pruned, report = prune(net, example(2), cfg, 0.25)
    assert first in report.ignored
    assert dict(pruned.named_modules())[first].out_channels == dict(net.named_modules())[first].out_channels
    assert report.layer_ratios and set(report.layer_ratios.values()) == {0.75}
    with pytest.raises(ConfigError, match="prune.ignore: 'nothing.here' matches no module"):
        prune(net, example(2), PruneConfig(ignore=["nothing.here"]), 0.5)


def test_torchscript_and_onnx_models_say_they_cannot_be_pruned():
    scripted = torch.jit.trace(tiny_unet(2), torch.rand(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="(?s)TorchScript.*model.weights: pytorch_state_dict"):
        prune(scripted, example(2), PruneConfig(), 0.5)
    with pytest.raises(ConfigError, match="only as ONNX"):
        prune_mod.check_prunable(None)


# -------------------------------------------------------------------------------------- fine-tuning


def test_distillation_recovers_fidelity_that_pruning_lost():
    """No labels: the pruned network learns from the original's outputs and gets closer to it."""
    from efficientbioai import metrics

    teacher = monai_net("UNet", 2)
    images = [blobs((96, 96), n=10, seed=s)[0][None] for s in range(3)]
    rng = np.random.default_rng(1)
    val = [im[:, y : y + 48, x : x + 48] for im in images for y, x in rng.integers(0, 48, (2, 2))]
    held = [blobs((48, 48), n=3, seed=100 + s)[0][None] for s in range(4)]  # never seen in training

    def fidelity(net) -> float:
        with torch.no_grad():
            a = np.concatenate([net(torch.from_numpy(h[None])).numpy() for h in held])
            b = np.concatenate([teacher(torch.from_numpy(h[None])).numpy() for h in held])
        return metrics.pearson(a, b)

    pruned, _ = prune(teacher, images[0][None, :, :64, :64], PruneConfig(), 0.5)
    before = fidelity(pruned)
    tuned, report = fine_tune(
        pruned, teacher, images, None, val, (48, 48), FineTuneConfig(steps=60, lr=3e-3, batch_size=4),
        task=None, postprocessing=[], halo=None, threads=2, quiet=True,
    )  # fmt: skip
    after = fidelity(tuned)
    assert report.mode == "distill"
    assert report.val_pearson_best >= report.val_pearson_before
    assert after > before + 0.05, (before, after)


def test_supervised_fine_tuning_needs_a_differentiable_postprocessing():
    net = monai_net("UNet", 2)
    img = [blobs((64, 64), seed=0)[0][None]]
    with pytest.raises(ConfigError, match="use prune.finetune.mode: distill"):
        fine_tune(
            net, net, img, [np.zeros_like(img[0])], img, (64, 64), FineTuneConfig(steps=1, mode="supervised"),
            task="restoration", postprocessing=[{"id": "scale_range", "kwargs": {}}], halo=None, threads=2,
            quiet=True,
        )  # fmt: skip


# ------------------------------------------------------------------------------------ configuration


def test_config_rules_for_pruning_and_budgets():
    base = {"model": {"kind": "monai", "name": "UNet", "axes": "bcyx"}, "output": "x"}
    c = validate_config(
        {**base, "quantize": {"strategy": "auto", "max_drop": 0.01}, "prune": {"ratio": [0.3, 0.5]}}
    )
    assert c.quantize.max_drop.metric == "pearson" and c.quantize.max_drop.value == 0.01
    assert c.prune.ratios == [0.3, 0.5]
    # a budget applies by default (Pearson drop 0.01, absolute); only an explicit null switches it off
    d = validate_config(base).quantize.max_drop
    assert (d.metric, d.value, d.type) == ("pearson", 0.01, "absolute")
    assert validate_config({**base, "quantize": {"max_drop": None}}).quantize.max_drop is None
    assert validate_config({**base, "quantize": {"strategy": "auto"}}).quantize.max_drop.value == 0.01
    # strategy auto climbs the pruning ladder from small to large ratios; by default 0.25 then 0.5
    auto = {**base, "quantize": {"strategy": "auto"}}
    assert validate_config({**auto, "prune": {}}).prune.auto_ratios() == [0.25, 0.5]
    assert validate_config({**auto, "prune": {"ratio": [0.6, 0.2]}}).prune.auto_ratios() == [0.2, 0.6]
    bad = [
        ({"quantize": {"strategy": "auto", "max_drop": None}}, "needs an accuracy budget"),
        (
            {"quantize": {"strategy": "auto", "max_drop": 0.01, "precision": "int8"}},
            "remove quantize.precision",
        ),
        ({"prune": {"ratio": [0.3, 0.5]}}, "only tried by quantize.strategy auto"),
        ({"prune": {"ratio": 1.0}}, "strictly between 0 and 1"),
        ({"prune": {"ratoi": 0.5}}, "did you mean 'ratio'"),
        ({"prune": {"finetune": {"mode": "supervised"}}}, "needs calibration.targets"),
        ({"quantize": {"max_drop": {"metric": "task", "value": 0.01}}}, "needs a task metric"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            validate_config({**base, **extra})


# ------------------------------------------------------------------------------ compress end to end


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def unet3d(tmp_path, images3d) -> dict:
    ckpt = tmp_path / "unet3d.pt"
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [16, 32, 64], "strides": [2, 2],
              "num_res_units": 2}  # fmt: skip
    torch.manual_seed(0)
    from monai.networks.nets import UNet

    torch.save(UNet(**kwargs).state_dict(), ckpt)
    return {
        "model": {
            "kind": "monai",
            "name": "UNet",
            "kwargs": kwargs,
            "checkpoint": str(ckpt),
            "axes": "bczyx",
        },
        "calibration": {"images": str(images3d / "*.tif"), "num_tiles": 8, "tile_shape": [16, 32, 32]},
        "fidelity": {"num_tiles": 4},
        "engine": {"latency_repeats": 3},
        "output": str(tmp_path / "runs" / "auto"),
    }


@pytest.mark.slow
def test_cli_auto_strategy_with_pruning_keeps_the_fastest_candidate_within_budget(tmp_path, unet3d):
    cfg = {
        **unet3d,
        "quantize": {"strategy": "auto", "max_drop": 0.5},
        "prune": {"ratio": [0.5], "finetune": {"steps": 6, "batch_size": 1, "val_tiles": 2}},
    }
    proc = run_cli(
        "compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)), "--quiet", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "strategy auto" in proc.stdout and "prune 0.5 + int8" in proc.stdout
    m = read_manifest(Path(unet3d["output"])).model_dump()
    cands = {c["name"]: c for c in m["strategy"]["candidates"]}
    assert set(cands) == {
        "int8", "int8 + float fallback", "bf16", "fp32",
        "prune 0.5 + int8", "prune 0.5 + int8 + float fallback", "prune 0.5 + bf16", "prune 0.5 + fp32",
    }  # fmt: skip
    timed = [
        c
        for c in cands.values()
        if c["latency_ms"] is not None and c["status"] in ("within budget", "chosen")
    ]
    chosen = cands[m["strategy"]["chosen"]]
    assert chosen["status"] == "chosen" and chosen["latency_ms"] == min(c["latency_ms"] for c in timed)
    assert cands["int8 + float fallback"]["status"].startswith("skipped")  # int8 already held the budget
    assert cands["prune 0.5 + fp32"]["parameters"] < 0.35 * cands["fp32"]["parameters"]
    assert m["precision"] == chosen["precision"]
    assert m["size"]["parameters_compressed"] == chosen["parameters"]
    if chosen["prune_ratio"]:
        steps = [t["step"] for t in m["transformations"]]
        assert steps[:2] == ["prune", "fine_tune"]


@pytest.mark.slow
def test_tight_budget_selects_a_higher_precision_and_holds(tmp_path, unet3d):
    cfg = {**unet3d, "quantize": {"strategy": "auto", "max_drop": {"metric": "pearson", "value": 2e-4}}}
    proc = run_cli(
        "compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)), "--quiet", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(Path(unet3d["output"])).model_dump()
    cands = {c["name"]: c for c in m["strategy"]["candidates"]}
    assert cands["int8"]["status"].startswith("over budget")
    assert m["strategy"]["chosen"] != "int8"
    assert m["fidelity"]["pearson"] >= 1 - 2e-4
    fb = cands["int8 + float fallback"]
    # accuracy-controlled int8 either held the budget with some layers back in float, or said why not
    assert (
        fb["status"] in ("within budget", "chosen")
        and fb["float_layers"]
        or fb["status"].startswith(("over budget", "failed"))
    )


@pytest.mark.slow
def test_impossible_budget_fails_clearly_and_writes_nothing(tmp_path, unet3d):
    cfg = {**unet3d, "quantize": {"precision": "bf16", "max_drop": 1e-12}}
    proc = run_cli("compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert proc.returncode != 0
    assert "exceeds quantize.max_drop" in proc.stderr and "Traceback" not in proc.stderr
    assert not Path(unet3d["output"]).exists() and not list(Path(unet3d["output"]).parent.glob(".*tmp*"))


@pytest.mark.slow
def test_default_budget_refuses_an_untuned_pruned_model_and_names_the_fixes(tmp_path, unet3d):
    # no budget in the config: the default (Pearson drop ≤ 0.01) still applies to a pruned candidate
    cfg = {**unet3d, "prune": {"ratio": 0.5, "finetune": {"steps": 0, "val_tiles": 2}}}
    proc = run_cli("compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr
    assert "Traceback" not in err and "within budget" not in proc.stdout + err
    assert "prune 0.5 + int8" in err and "exceeds quantize.max_drop (1 − Pearson r to the original ≤ 0.01)" in err
    drop = float(re.search(r"prune 0\.5 \+ int8: drop ([0-9.e-]+) exceeds", err).group(1))
    assert drop > 0.01
    for fix in ("fine-tune longer", "smaller prune.ratio", "strategy: auto", "max_drop: null"):
        assert fix in err, fix
    assert not Path(unet3d["output"]).exists() and not list(Path(unet3d["output"]).parent.glob(".*tmp*"))


@pytest.mark.slow
def test_max_drop_null_writes_the_artifact_and_says_the_budget_was_off(tmp_path, unet3d):
    cfg = {
        **unet3d,
        "quantize": {"max_drop": None},
        "prune": {"ratio": 0.5, "finetune": {"steps": 0, "val_tiles": 2}},
    }
    proc = run_cli("compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no accuracy budget is checked" in proc.stderr
    assert "accuracy budget: OFF (quantize.max_drop: null)" in proc.stdout
    assert "within budget" not in proc.stdout + proc.stderr
    m = read_manifest(Path(unet3d["output"])).model_dump()
    assert m["strategy"]["budget"] is None
    (cand,) = m["strategy"]["candidates"]
    assert cand["status"] == "chosen" and cand["metric_drop"] is None
    assert m["fidelity"]["pearson"] < 0.99  # the untuned pruned network really is off: nothing hid it


def test_fine_tuning_stops_early_when_the_target_drop_is_reached_or_nothing_improves():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(1, 64, 64)).astype(np.float32) for _ in range(2)]
    val = [rng.normal(size=(1, 32, 32)).astype(np.float32) for _ in range(2)]

    def run(student, **kw):
        cfg = FineTuneConfig(steps=400, lr=3e-3, batch_size=2, eval_every=10, **kw.pop("cfg", {}))
        return fine_tune(student, teacher, images, None, val, (32, 32), cfg, task=None,
                         postprocessing=[], halo=None, threads=1, **kw)  # fmt: skip

    # a copy of the teacher already matches it: no step is spent
    _, rep = run(copy.deepcopy(teacher), stop_at_drop=0.01)
    assert rep.steps == 0 and "already" in rep.stopped
    # a perturbed copy gets there after some steps, well before the cap
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # validation r ≈ 0.74 to the teacher before training
    _, rep = run(student, stop_at_drop=0.01)
    assert 0 < rep.steps < 400 and rep.val_pearson_best >= 0.99 and "≤ 0.01" in rep.stopped
    # a network that cannot learn (frozen: lr is irrelevant, nothing changes) stops on patience
    frozen = copy.deepcopy(student)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen[0].bias.requires_grad_(True)
    _, rep = run(frozen, cfg={"patience": 3, "min_delta": 0.5}, stop_at_drop=None)
    assert rep.steps == 30 and "no improvement" in rep.stopped


SEG_NET_PY = '''
import torch
from torch import nn


class SmallSegNet(nn.Module):
    """Two levels, a concatenated skip connection, batch norm and shared-slope PReLU."""

    def __init__(self, c=16):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.PReLU())
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.PReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.PReLU())
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        e = self.enc(x)
        return self.out(self.dec(torch.cat([self.up(self.down(e)), e], 1)))


def make(c=16):
    return SmallSegNet(c)
'''


@pytest.mark.slow
def test_pruned_int8_artifact_runs_in_infer_without_the_original_class(tmp_path, images2d):
    """Compress with the network's code importable; infer in a process where it is not."""
    imgs, masks = images2d
    code = tmp_path / "code"
    code.mkdir()
    (code / "segnets.py").write_text(SEG_NET_PY)
    sys.path.insert(0, str(code))
    try:
        import segnets

        torch.manual_seed(0)
        torch.save(segnets.make().state_dict(), tmp_path / "seg.pt")
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("segnets", None)
    cfg = {
        "model": {
            "kind": "torch",
            "factory": "segnets:make",
            "checkpoint": str(tmp_path / "seg.pt"),
            "axes": "bcyx",
        },
        "calibration": {
            "images": str(imgs / "*.tif"),
            "targets": str(masks / "*.tif"),
            "num_tiles": 8,
            "tile_shape": [48, 48],
        },  # fmt: skip
        # 10 fine-tuning steps on a random network miss the default budget: this test is about loading a
        # pruned artifact, so the budget is switched off explicitly (the budget has its own tests)
        "quantize": {"precision": "int8", "max_drop": None},
        "prune": {"ratio": 0.5, "finetune": {"steps": 10, "val_tiles": 2}},
        "fidelity": {"num_tiles": 4, "task": "semantic"},
        "engine": {"latency_repeats": 2},
        "output": str(tmp_path / "pruned"),
    }
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{REPO}", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "efficientbioai", "compress", "--config", str(write_config(tmp_path / "c.yaml", cfg)),
         "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = read_manifest(tmp_path / "pruned").model_dump()
    prune_step, ft_step = m["transformations"][:2]
    assert prune_step["step"] == "prune" and prune_step["parameters_after"] < prune_step["parameters_before"]
    assert ft_step["mode"] == "supervised"  # targets were given
    assert m["size"]["parameters_compressed"] == prune_step["parameters_after"]

    # infer: the network's module is not importable in this process
    inp = tmp_path / "whole.tif"
    tifffile.imwrite(inp, blobs((120, 136), seed=5)[0])
    icfg = {"model": str(tmp_path / "pruned"), "input": str(inp), "output": str(tmp_path / "pred"),
            "tiling": {"tile_shape": [48, 48]}, "energy": False}  # fmt: skip
    proc = run_cli("infer", "--config", str(write_config(tmp_path / "i.yaml", icfg)), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    pred = tifffile.imread(tmp_path / "pred" / "whole.tif")
    assert pred.shape[-2:] == (120, 136) and np.isfinite(pred).all()


@pytest.mark.slow
def test_bioimageio_state_dict_package_is_pruned_from_its_pytorch_weights(tmp_path, images2d):
    imgs, _ = images2d
    (tmp_path / "segnets.py").write_text(SEG_NET_PY)
    sys.path.insert(0, str(tmp_path))
    try:
        import segnets

        torch.manual_seed(0)
        net = segnets.make()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("segnets", None)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    torch.jit.trace(net.eval(), torch.rand(1, 1, 32, 32)).save(str(tmp_path / "weights.torchscript.pt"))
    axes_in = [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]},
               {"type": "space", "id": "y", "size": {"min": 16, "step": 8}},
               {"type": "space", "id": "x", "size": {"min": 16, "step": 8}}]  # fmt: skip
    axes_out = [{"type": "batch"}, {"type": "channel", "channel_names": ["p"]},
                {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"}},
                {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"}}]  # fmt: skip
    rdf = {
        "format_version": "0.5.4", "type": "model", "name": "segnet",
        "inputs": [{"id": "raw", "axes": axes_in}],
        "outputs": [{"id": "out", "axes": axes_out, "postprocessing": [{"id": "sigmoid"}]}],
        "weights": {
            "torchscript": {"source": "weights.torchscript.pt"},
            "pytorch_state_dict": {
                "source": "weights.pt", "architecture": {"source": "segnets.py", "callable": "SmallSegNet"},
            },
        },
    }  # fmt: skip
    (tmp_path / "bioimageio.yaml").write_text(yaml.safe_dump(rdf))
    cfg = {
        "model": {"kind": "bioimageio", "path": str(tmp_path)},
        "calibration": {"images": str(imgs / "*.tif"), "num_tiles": 6, "tile_shape": [48, 48]},
        "quantize": {"precision": "int8", "max_drop": None},  # about loading; 4 steps miss any budget
        "prune": {"ratio": 0.5, "finetune": {"steps": 4, "val_tiles": 2}},
        "fidelity": {"num_tiles": 3},
        "engine": {"latency_repeats": 2},
        "output": str(tmp_path / "out"),
    }
    result = compress(validate_config(cfg), quiet=True)
    m = result.manifest.model_dump()
    assert m["model"]["weights"] == "pytorch_state_dict"  # chosen over TorchScript because pruning needs it
    assert m["transformations"][0]["step"] == "prune"
    assert m["size"]["parameters_compressed"] < m["size"]["parameters"]
    # TorchScript weights named explicitly cannot be pruned, and the error says what to use instead
    cfg["model"]["weights"] = "torchscript"
    with pytest.raises(ConfigError, match="model.weights: pytorch_state_dict"):
        compress(validate_config({**cfg, "output": str(tmp_path / "out2")}), quiet=True)
    assert not (tmp_path / "out2").exists()
