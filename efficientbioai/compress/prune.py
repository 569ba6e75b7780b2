"""Structured pruning (Torch-Pruning) and the fine-tuning that recovers what pruning lost.

Pruning removes whole channels, so convolutions, normalisation layers and the concatenated skip
connections of U-Nets all shrink and the exported network is physically smaller. Fine-tuning then trains
the pruned network on tiles of the user's images: against their targets when there are some, otherwise
by distillation from the original network (the teacher), so users without labels can prune too.
"""

from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from efficientbioai import metrics
from efficientbioai.compress.calibration import crop_halo
from efficientbioai.config import FineTuneConfig, PruneConfig
from efficientbioai.errors import ConfigError, EfficientBioAIError
from efficientbioai.training import Evaluation, fit, random_crops


def _is_conv(module) -> bool:
    import torch

    return isinstance(module, torch.nn.modules.conv._ConvNd)


def count_parameters(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def check_prunable(module) -> None:
    """Raise a clear error for networks Torch-Pruning cannot restructure (TorchScript, ONNX-only)."""
    import torch

    if module is None:
        raise ConfigError(
            "prune: this model exists only as ONNX, and ONNX graphs cannot be pruned",
            "load the network from its PyTorch code (model.kind torch, monai, or a bioimage.io package "
            "with pytorch_state_dict weights), or remove the prune section",
        )
    if isinstance(module, torch.jit.ScriptModule):
        raise ConfigError(
            "prune: this model is TorchScript, whose layers cannot be restructured",
            "load the network from its PyTorch code: model.kind torch / monai, or for a bioimage.io package "
            "model.weights: pytorch_state_dict (when the package has them); or remove the prune section",
        )
    if not any(_is_conv(m) for m in module.modules()):
        raise ConfigError(
            "prune: the network has no convolution to prune",
            "remove the prune section; quantization alone applies to any network",
        )


# --------------------------------------------------------------------------- Torch-Pruning on torch 2.13


def _prelu_pruner():
    """A PReLU pruner that knows the channel count of a shared-slope PReLU.

    Torch-Pruning's own pruner reports ``None`` channels for ``PReLU(num_parameters=1)`` (one slope shared
    by all channels, MONAI's default activation). Its concatenation index mapping then sums that ``None``
    with the other inputs' channel counts and the dependency graph cannot be built (TypeError on torch
    2.13, e.g. for every MONAI UNet). We report the channel count the layer saw in the tracing forward
    pass instead (recorded by a forward pre-hook, see :func:`_record_prelu_channels`).
    """
    from torch_pruning.pruner.function import PReLUPruner

    class SharedSlopePReLUPruner(PReLUPruner):
        def get_out_channels(self, layer):
            if layer.num_parameters == 1:
                return getattr(layer, "_ebai_channels", None)
            return layer.num_parameters

        def get_in_channels(self, layer):
            return self.get_out_channels(layer)

    return SharedSlopePReLUPruner()


@contextlib.contextmanager
def _record_prelu_channels(module):
    import torch

    def hook(mod, inputs):
        mod._ebai_channels = int(inputs[0].shape[1])

    handles = [
        m.register_forward_pre_hook(hook)
        for m in module.modules()
        if isinstance(m, torch.nn.PReLU) and m.num_parameters == 1
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in module.modules():
            if hasattr(m, "_ebai_channels"):
                del m._ebai_channels


@contextlib.contextmanager
def _traceable_instance_norm(module):
    """Instance normalisation that Torch-Pruning can see, for the duration of the tracing.

    On torch 2.13 ``InstanceNorm`` runs as reshape → batch norm → view, so the dependency graph meets a
    reshape where the normalisation layer should be and loses the channel count (U-Nets with affine
    instance norm, e.g. MONAI's BasicUNet, then fail in the concatenation mapping). Group normalisation
    with one group per channel computes the same thing as one operation; it stands in while tracing.
    Layers with running statistics are left as they are (they are not the same function in eval mode).
    """
    import torch
    import torch.nn.functional as F

    def forward(self, x):
        return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)

    patched = [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats
    ]
    for m in patched:
        m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def output_layers(module, example) -> list:
    """The convolutions whose channels are the network's outputs: for every output tensor, the last
    convolutions on each path back from it (through activations, reshapes, concatenations), so that a
    network with several heads keeps every head's channels."""
    import torch

    from efficientbioai.models.outputs import flatten_outputs

    produced: dict[Any, Any] = {}  # grad_fn of a convolution's output → the convolution
    order: list = []

    def hook(m, i, o):
        order.append(m)
        if getattr(o, "grad_fn", None) is not None:
            produced[o.grad_fn] = m

    handles = [m.register_forward_hook(hook) for m in module.modules() if _is_conv(m)]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            outs = flatten_outputs(module(example))
    finally:
        for h in handles:
            h.remove()
    found: list = []
    seen = set()
    stack = [o.grad_fn for o in outs if getattr(o, "grad_fn", None) is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in produced:  # stop at the first convolution on this path
            if produced[fn] not in found:
                found.append(produced[fn])
            continue
        stack += [nxt for nxt, _ in fn.next_functions]
    return found or order[-1:]


@dataclass
class PruneReport:
    method: str
    ratio: float
    params_before: int
    params_after: int
    ignored: list[str] = field(default_factory=list)
    layer_ratios: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": "prune",
            "tool": "torch-pruning",
            "method": self.method,
            "ratio": self.ratio,
            "layer_ratios": self.layer_ratios,
            "left_alone": self.ignored,
            "parameters_before": self.params_before,
            "parameters_after": self.params_after,
        }


def prune(module, example: np.ndarray, cfg: PruneConfig, ratio: float) -> tuple[Any, PruneReport]:
    """A pruned copy of ``module``: ``ratio`` of each prunable layer's channels removed by ``cfg.method``.

    ``example`` is a (1, C, *tile) float32 input used to trace the network. The original is not modified.
    """
    import torch

    try:
        import torch_pruning as tp
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EfficientBioAIError(
            "prune: Torch-Pruning is not installed", "pip install torch-pruning"
        ) from exc

    check_prunable(module)
    net = copy.deepcopy(module).eval()
    x = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    names = {m: n for n, m in net.named_modules()}
    ignored = output_layers(net, x)
    for pattern in cfg.ignore:
        hits = [m for n, m in net.named_modules() if n and re.fullmatch(pattern, n)]
        if not hits:
            raise ConfigError(
                f"prune.ignore: '{pattern}' matches no module",
                "patterns are regular expressions over module names such as "
                + ", ".join(f"'{n}'" for n, m in list(net.named_modules())[1:] if _is_conv(m))[:300],
            )
        ignored += hits
    ratio_dict = {}
    for pattern, r in cfg.layer_ratios.items():
        hits = [m for n, m in net.named_modules() if n and re.fullmatch(pattern, n) and _is_conv(m)]
        if not hits:
            raise ConfigError(
                f"prune.layer_ratios: '{pattern}' matches no convolution",
                "patterns are regular expressions over module names such as "
                + ", ".join(f"'{n}'" for n, m in list(net.named_modules())[1:] if _is_conv(m))[:300],
            )
        ratio_dict.update(dict.fromkeys(hits, r))
    importance = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(),
    }[cfg.method]()
    before = count_parameters(net)
    try:
        # Torch-Pruning traces the network through autograd: gradients must be on here.
        with (
            _record_prelu_channels(net),
            _traceable_instance_norm(net),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            pruner = tp.pruner.MetaPruner(
                net,
                x,
                importance=importance,
                pruning_ratio=ratio,
                pruning_ratio_dict=ratio_dict or None,
                ignored_layers=ignored,
                round_to=cfg.round_to,
                global_pruning=cfg.global_pruning,
                customized_pruners={torch.nn.PReLU: _prelu_pruner()},
            )
            pruner.step()
        with torch.no_grad():
            out = net(x)
    except ConfigError:
        raise
    except Exception as exc:
        raise EfficientBioAIError(
            f"prune: Torch-Pruning could not restructure this network: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}",
            "leave the failing part alone with prune.ignore (module names), or remove the prune section",
        ) from exc
    with torch.no_grad():
        ref = module(x)
    if isinstance(out, tuple | list):
        out, ref = out[0], ref[0]
    if tuple(out.shape) != tuple(ref.shape):
        raise EfficientBioAIError(
            f"prune: the pruned network returns shape {tuple(out.shape)} instead of {tuple(ref.shape)}",
            "leave the output layers alone with prune.ignore",
        )
    report = PruneReport(
        method=cfg.method,
        ratio=ratio,
        params_before=before,
        params_after=count_parameters(net),
        ignored=[names.get(m, "?") for m in ignored],
        layer_ratios={names.get(m, "?"): r for m, r in ratio_dict.items()},
    )
    return net, report


# -------------------------------------------------------------------------------------- fine-tuning


@dataclass
class FineTuneReport:
    mode: str
    steps: int
    best_step: int
    val_pearson_before: float
    val_pearson_best: float
    history: list[tuple[int, float]] = field(default_factory=list)
    stopped: str = ""  # why training ended: target reached, no improvement, or the step cap

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": "fine_tune",
            "mode": self.mode,
            "steps": self.steps,
            "best_step": self.best_step,
            "stopped": self.stopped,
            "validation_pearson_to_original": {
                "before": self.val_pearson_before,
                "best": self.val_pearson_best,
            },
        }


DEFAULT_EVAL_EVERY = 50
"""Validation interval of fine-tuning when ``eval_every`` is not given (or steps / 10 when smaller)."""


def _supervised_loss(postprocessing: list[dict[str, Any]], task: str):
    """The task's loss on the raw network output, or None when the postprocessing is not differentiable here."""
    import torch.nn.functional as F

    ids = [s["id"] for s in postprocessing if s["id"] not in ("ensure_dtype", "binarize")]
    if ids not in ([], ["sigmoid"]):
        return None
    logits = ids == ["sigmoid"]
    if task == "semantic":
        if logits:
            return lambda out, t: F.binary_cross_entropy_with_logits(out, (t > 0.5).float())
        return lambda out, t: F.binary_cross_entropy(out.clamp(1e-6, 1 - 1e-6), (t > 0.5).float())
    if logits:
        return lambda out, t: F.mse_loss(out.sigmoid(), t)
    return lambda out, t: F.mse_loss(out, t)


def fine_tune(
    student,
    teacher,
    images: list[np.ndarray],
    targets: list[np.ndarray] | None,
    val_tiles: list[np.ndarray],
    tile_shape: tuple[int, ...],
    cfg: FineTuneConfig,
    *,
    task: str | None,
    postprocessing: list[dict[str, Any]],
    halo: list[int] | None,
    threads: int,
    seed: int = 0,
    stop_at_drop: float | None = None,
    quiet: bool = False,
):
    """Train ``student`` (the pruned network) on random tiles of the preprocessed ``images``.

    Supervised against ``targets`` with the task's loss, or by distillation (mean squared error to the
    ``teacher``'s raw output). Every ``eval_every`` steps the student is scored by Pearson r against the
    teacher on ``val_tiles`` (tiles apart from the fidelity check's); the best state is kept and returned.
    Training stops at ``cfg.steps``, or earlier: once 1 − r ≤ ``stop_at_drop``, or after ``cfg.patience``
    validations in a row without a rise of ``cfg.min_delta``.
    """
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mode = cfg.mode
    if mode == "auto":
        mode = "supervised" if targets is not None else "distill"
    loss_fn = None
    if mode == "supervised":
        loss_fn = _supervised_loss(postprocessing, task or "restoration")
        if loss_fn is None:
            raise ConfigError(
                "prune.finetune.mode supervised: the model's postprocessing "
                f"({', '.join(s['id'] for s in postprocessing)}) has no training loss here",
                "use prune.finetune.mode: distill (learns from the original model's outputs)",
            )
    teacher = teacher.eval()
    val = torch.from_numpy(np.stack(val_tiles).astype(np.float32))

    def raw(net, x):
        out = net(x)
        return out[0] if isinstance(out, tuple | list) else out

    with torch.no_grad():
        val_ref = np.concatenate([crop_halo(raw(teacher, v[None]), halo).numpy() for v in val])

    def score(net) -> float:
        net.eval()
        with torch.no_grad():
            out = np.concatenate([crop_halo(raw(net, v[None]), halo).numpy() for v in val])
        return metrics.pearson(out, val_ref)

    best = score(student)
    before = best
    best_state = copy.deepcopy(student.state_dict())
    best_step = 0
    history = [(0, best)]
    if cfg.steps == 0:
        return student, FineTuneReport(mode, 0, 0, before, best, history, "no fine-tuning (steps: 0)")
    if stop_at_drop is not None and 1 - best <= stop_at_drop:
        return student.eval(), FineTuneReport(
            mode, 0, 0, before, best, history, f"validation drop already ≤ {stop_at_drop:g}"
        )
    every = cfg.eval_every or max(1, min(DEFAULT_EVAL_EVERY, cfg.steps // 10))
    stale = 0  # validations in a row without improvement
    stopped = f"step cap ({cfg.steps})"
    supervised = mode == "supervised"

    def batches():
        xb, tb = random_crops(rng, images, targets if supervised else None, tile_shape, cfg.batch_size)
        x = torch.from_numpy(xb.astype(np.float32))
        if supervised:
            return x, crop_halo(torch.from_numpy(tb.astype(np.float32)), halo)
        with torch.no_grad():  # distillation: the teacher's raw output is the target
            return x, crop_halo(raw(teacher, x), halo)

    def evaluate(step: int) -> Evaluation:
        nonlocal best, best_step, best_state, stale, stopped
        r = score(student)
        history.append((step, r))
        stale = 0 if r > best + cfg.min_delta else stale + 1
        if r > best:
            best, best_step = r, step
            best_state = copy.deepcopy(student.state_dict())
        shown = {"val_r": f"{r:.4f}", "best": f"{best:.4f}"}
        if stop_at_drop is not None and 1 - best <= stop_at_drop:
            stopped = f"validation drop {1 - best:.4g} ≤ {stop_at_drop:g} at step {step}"
            return Evaluation(True, shown)
        if cfg.patience is not None and stale >= cfg.patience:
            stopped = (
                f"no improvement ≥ {cfg.min_delta:g} in {cfg.patience} validations (every {every} "
                f"steps), stopped at step {step}"
            )
            return Evaluation(True, shown)
        return Evaluation(False, shown)

    last = fit(
        student,
        batches,
        loss_fn if supervised else torch.nn.functional.mse_loss,
        forward=lambda x: crop_halo(raw(student, x), halo),
        steps=cfg.steps,
        lr=cfg.lr,
        cosine_lr=True,
        evaluate=evaluate,
        eval_every=every,
        desc=f"fine-tuning ({mode})",
        quiet=quiet,
    )
    student.load_state_dict(best_state)
    return student.eval(), FineTuneReport(mode, last, best_step, before, best, history, stopped)
