"""bioimage.io model packages (format 0.4 and 0.5): a folder, a .zip or the package's yaml.

Read without the bioimageio libraries: the package's yaml gives the axes, tile sizes, halo, pre- and
post-processing and test tensors; the weights are taken in the first usable format among TorchScript,
``pytorch_state_dict`` (when the architecture source is in the package or importable) and ONNX.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from efficientbioai.errors import ModelLoadError
from efficientbioai.models.base import BaseParser, LoadedModel, register_parser, scratch_dir, sha256
from efficientbioai.processing import normalize_steps

WEIGHT_ORDER = ("torchscript", "pytorch_state_dict", "onnx")
_AXIS_TYPES = {"batch": "b", "channel": "c", "index": "i", "time": "t"}


def find_rdf(path: Path) -> Path:
    """The package's yaml for a folder, a zip (extracted to a temporary folder) or the yaml itself."""
    if path.is_file() and path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(path) as zf:
                dst = scratch_dir("bioimageio")
                zf.extractall(dst)
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(f"{path} is not a valid zip archive", "re-download the package") from exc
        path = dst
    if path.is_file():
        return path
    for name in ("bioimageio.yaml", "rdf.yaml"):
        if (path / name).is_file():
            return path / name
    found = (
        sorted(path.glob("*.bioimageio.yaml"))
        + sorted(path.glob("*/bioimageio.yaml"))
        + sorted(path.glob("*/rdf.yaml"))
    )
    if found:
        return found[0]
    raise ModelLoadError(
        f"no bioimageio.yaml or rdf.yaml in {path}",
        "point model.path at a bioimage.io package folder, its .zip or its yaml",
    )


def _axes_05(axes: list[dict[str, Any]]) -> tuple[str, list[Any]]:
    letters, entries = "", []
    for ax in axes:
        kind = ax.get("type")
        letter = _AXIS_TYPES.get(kind) if kind != "space" else str(ax.get("id", "x"))
        letters += letter
        entries.append(ax)
    return letters, entries


def _check_axes(letters: str, where: str) -> str:
    if letters not in ("bcyx", "bczyx"):
        raise ModelLoadError(
            f"{where}: axes '{letters}' are not supported (efficientbioai handles bcyx and bczyx)",
            "use a model whose input is batch, channel, [z,] y, x",
        )
    return letters


class Package:
    """A parsed bioimage.io model description (the subset efficientbioai needs)."""

    def __init__(self, rdf: Path):
        self.rdf = rdf
        self.root = rdf.parent
        try:
            self.doc = yaml.safe_load(rdf.read_text())
        except yaml.YAMLError as exc:
            raise ModelLoadError(f"{rdf} is not valid YAML: {exc}") from exc
        if not isinstance(self.doc, dict) or self.doc.get("type", "model") != "model":
            raise ModelLoadError(f"{rdf} is not a bioimage.io model description")
        self.version = str(self.doc.get("format_version", "0.4"))
        self.is05 = not self.version.startswith("0.4")
        if len(self.doc.get("inputs", [])) != 1 or len(self.doc.get("outputs", [])) != 1:
            raise ModelLoadError(f"{rdf}: only models with one input and one output are supported")
        self.inp = self.doc["inputs"][0]
        self.out = self.doc["outputs"][0]

    def file(self, source: str) -> Path | None:
        p = self.root / source
        return p if p.is_file() else None

    def axes(self) -> str:
        if self.is05:
            return _check_axes(_axes_05(self.inp["axes"])[0], f"{self.rdf} input")
        return _check_axes(str(self.inp["axes"]).lower(), f"{self.rdf} input")

    def channels(self) -> int | None:
        if self.is05:
            for ax in self.inp["axes"]:
                if ax.get("type") == "channel":
                    return len(ax.get("channel_names") or []) or ax.get("size")
            return None
        shape = self.inp.get("shape")
        return int(shape[1]) if isinstance(shape, list) else int(shape["min"][1])

    def sizes(self) -> tuple[list[int] | None, list[int] | None, list[int] | None]:
        """(tile_min, tile_step, preferred tile) over spatial axes; step None when the size is fixed."""
        if self.is05:
            mins, steps, fixed = [], [], []
            for ax in self.inp["axes"]:
                if ax.get("type") != "space":
                    continue
                size = ax.get("size")
                if isinstance(size, int):
                    fixed.append(size)
                elif isinstance(size, dict) and "min" in size:
                    mins.append(int(size["min"]))
                    steps.append(int(size.get("step", 1)))
            if fixed and not mins:
                return None, None, fixed
            if mins and not fixed:
                return mins, steps, None
            return None, None, None
        shape = self.inp.get("shape")
        if isinstance(shape, list):
            return None, None, [int(s) for s in shape[2:]]
        return [int(s) for s in shape["min"][2:]], [int(s) for s in shape["step"][2:]], None

    def halo(self) -> list[int] | None:
        if self.is05:
            return [int(ax.get("halo", 0)) for ax in self.out["axes"] if ax.get("type") == "space"]
        halo = self.out.get("halo")
        return [int(h) for h in halo[2:]] if halo else None

    def test_tensors(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.is05:
            ins = [self.inp.get("test_tensor", {}).get("source")]
            outs = [self.out.get("test_tensor", {}).get("source")]
        else:
            ins, outs = self.doc.get("test_inputs", []), self.doc.get("test_outputs", [])
        load = [self.file(s) for s in ins if s], [self.file(s) for s in outs if s]
        return [np.load(p) for p in load[0] if p], [np.load(p) for p in load[1] if p]

    def weights(self, prefer: str | None) -> tuple[str, dict[str, Any], Any]:
        """(format, weights entry, (constructor, kwargs) for pytorch_state_dict else None)."""
        entries = dict(self.doc.get("weights") or {})
        if "pytorch_script" in entries:  # format 0.4 name
            entries.setdefault("torchscript", entries.pop("pytorch_script"))
        order = (prefer,) if prefer else WEIGHT_ORDER
        reasons = []
        for fmt in order:
            entry = entries.get(fmt)
            if entry is None:
                reasons.append(f"{fmt}: not in the package")
                continue
            if self.file(str(entry.get("source", ""))) is None:
                reasons.append(f"{fmt}: weights file '{entry.get('source')}' is not in the package")
                continue
            arch = self._architecture(entry) if fmt == "pytorch_state_dict" else None
            if fmt == "pytorch_state_dict" and arch is None:
                reasons.append(f"{fmt}: architecture '{entry.get('architecture')}' is not importable")
                continue
            return fmt, entry, arch
        raise ModelLoadError(
            f"{self.rdf}: no usable weights ({'; '.join(reasons)})",
            "choose another format with model.weights, or download the weights into the package folder",
        )

    def _architecture(self, entry: dict[str, Any]):
        """The network's constructor for ``pytorch_state_dict`` weights, or None when unavailable."""
        import importlib
        import importlib.util

        arch = entry.get("architecture")
        kwargs = dict(entry.get("kwargs") or {})
        if isinstance(arch, dict):
            callable_name = arch.get("callable")
            kwargs = dict(arch.get("kwargs") or {})
            source, import_from = arch.get("source"), arch.get("import_from")
        elif isinstance(arch, str):
            source, _, callable_name = arch.rpartition(":")
            import_from = None if source.endswith(".py") else source
            source = source if source.endswith(".py") else None
        else:
            return None
        try:
            if source:
                path = self.file(source)
                if path is None:
                    return None
                spec = importlib.util.spec_from_file_location(f"_bioimageio_arch_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(import_from)
            return getattr(module, callable_name), kwargs
        except Exception:
            return None


@register_parser("bioimageio")
class BioImageIOParser(BaseParser):
    """A bioimage.io model package; axes, halo, tile sizes and processing come from the package."""

    def load(self) -> LoadedModel:
        from efficientbioai.models.onnx_file import make_dynamic
        from efficientbioai.models.pytorch import build, load_state_dict_into, load_torchscript

        pkg = Package(find_rdf(Path(self.config.path)))
        axes = pkg.axes()
        fmt, entry, arch = pkg.weights(self.config.weights)
        weights_path = pkg.file(entry["source"])
        module = onnx_path = None
        if fmt == "torchscript":
            module = load_torchscript(weights_path)
        elif fmt == "pytorch_state_dict":
            fn, kwargs = arch
            module = load_state_dict_into(
                build(fn, kwargs, "the package architecture"), weights_path, "the package"
            )
        else:
            onnx_path = scratch_dir("onnx") / "dynamic.onnx"
            make_dynamic(weights_path, onnx_path, axes)
        tile_min, tile_step, preferred = pkg.sizes()
        ins, outs = pkg.test_tensors()
        return LoadedModel(
            module=module,
            onnx_path=onnx_path,
            axes=axes,
            name=str(pkg.doc.get("name", pkg.root.name)),
            in_channels=pkg.channels(),
            preprocessing=normalize_steps(pkg.inp.get("preprocessing")),
            postprocessing=normalize_steps(pkg.out.get("postprocessing")),
            halo=pkg.halo(),
            tile_min=tile_min,
            tile_step=tile_step,
            preferred_tile=preferred,
            sample_inputs=ins,
            sample_outputs=outs,
            source={
                "path": str(self.config.path),
                "rdf": str(pkg.rdf),
                "format_version": pkg.version,
                "weights": fmt,
                "weights_file": str(weights_path),
                "sha256": sha256(weights_path),
            },
        )
