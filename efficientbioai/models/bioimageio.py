"""bioimage.io model packages (format 0.4 and 0.5): a folder, a .zip or the package's yaml.

Read without the bioimageio libraries: the package's yaml gives the axes, tile sizes, halo, pre- and
post-processing and test tensors; the weights are taken in the first usable format among TorchScript,
``pytorch_state_dict`` (when the architecture source is in the package or importable) and ONNX.

Nothing foreign is read or run: every file the description gives a ``sha256`` for (weights, the
architecture source, test and sample tensors, attachments; format 0.4's ``architecture_sha256``) is
checked when the package is opened, before any weights are loaded or any architecture code is imported;
a file the description names outside the package folder is refused, and so is a zip member that would
land outside the extraction folder. A missing ``sha256`` is allowed (many packages have none): the
loader's facts (``checksums``) say which files were verified and which had no checksum to verify.
"""

from __future__ import annotations

import re
import stat
import warnings
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml

from efficientbioai.errors import ModelLoadError
from efficientbioai.models.base import BaseParser, LoadedModel, register_parser, scratch_dir, sha256
from efficientbioai.processing import normalize_steps

WEIGHT_ORDER = ("torchscript", "pytorch_state_dict", "onnx")
_AXIS_TYPES = {"batch": "b", "channel": "c", "index": "i", "time": "t"}


REDOWNLOAD = (
    "re-download the package from where it was published (bioimage.io / Zenodo): the file is damaged or "
    "was modified; if you changed it on purpose, put its new sha256 into the package's yaml"
)


def _zip_member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member would be written outside the extraction folder (or is a link); None when fine."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in name.split("/"):
        return "a '..' component (it would be written outside the package folder)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def _extract(path: Path) -> Path:
    """A zip package extracted into a temporary folder, refusing members that would land outside it."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                problem = _zip_member_problem(info)
                if problem:
                    raise ModelLoadError(
                        f"model.path: {path}: the zip member '{info.filename}' has {problem}; a package's "
                        "files must stay inside it, so nothing was extracted",
                        "the zip was not written by bioimage.io tools or was tampered with: "
                        "re-download the package from where it was published",
                    )
            dst = scratch_dir("bioimageio")
            zf.extractall(dst)
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{path} is not a valid zip archive", "re-download the package") from exc
    return dst


def _find_in(path: Path, label: str | None = None) -> Path:
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
        f"no bioimageio.yaml or rdf.yaml in {label or path}",
        "point model.path at a bioimage.io package folder, its .zip or its yaml",
    )


def _locate(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(the package's yaml, the zip it came from or None, the extraction folder or None)."""
    if path.is_file() and (path.suffix.lower() == ".zip" or zipfile.is_zipfile(path)):
        dst = _extract(path)
        return _find_in(dst, f"the zip {path}"), path.expanduser().resolve(), dst
    if path.is_file():
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise ModelLoadError(
                f"model.path: {path} is a {path.suffix or 'suffix-less'} file, not a bioimage.io package",
                "point model.path at the package's folder, its .zip, or its bioimageio.yaml / rdf.yaml",
            )
        return path, None, None
    return _find_in(path), None, None


def find_rdf(path: Path) -> Path:
    """The package's yaml for a folder, a zip (extracted to a temporary folder) or the yaml itself."""
    return _locate(Path(path))[0]


def open_package(path: str | Path) -> Package:
    """The package at ``path`` (a folder, a zip or the yaml), its declared checksums verified."""
    rdf, archive, extracted = _locate(Path(path))
    return Package(rdf, archive=archive, extracted=extracted)


def _is_url(source: str) -> bool:
    return "://" in source


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
    """A parsed bioimage.io model description (the subset efficientbioai needs).

    Opening it checks every checksum the description declares (:meth:`verify_checksums`). ``archive``
    is the zip the package was extracted from (into ``extracted``): files are then named in messages and
    facts as ``<zip>!/<member>``, not by the temporary folder.
    """

    def __init__(self, rdf: Path, archive: Path | None = None, extracted: Path | None = None):
        self.rdf = rdf
        self.root = rdf.parent
        self.archive = archive
        self.extracted = extracted
        try:
            self.doc = yaml.safe_load(rdf.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ModelLoadError(
                f"{self.where(rdf)} is not a text file, so not a bioimage.io description",
                "point model.path at the package's folder, its .zip, or its bioimageio.yaml / rdf.yaml",
            ) from exc
        except yaml.YAMLError as exc:
            raise ModelLoadError(f"{self.where(rdf)} is not valid YAML: {exc}") from exc
        if not isinstance(self.doc, dict) or self.doc.get("type", "model") != "model":
            raise ModelLoadError(f"{self.where(rdf)} is not a bioimage.io model description")
        self.version = str(self.doc.get("format_version", "0.4"))
        self.is05 = not self.version.startswith("0.4")
        if len(self.doc.get("inputs", [])) != 1 or len(self.doc.get("outputs", [])) != 1:
            raise ModelLoadError(
                f"{self.where(rdf)}: only models with one input and one output are supported"
            )
        self.inp = self.doc["inputs"][0]
        self.out = self.doc["outputs"][0]
        self.skipped: list[str] = []  # why weights formats were passed over (see weights())
        self.checksums = self.verify_checksums()

    def where(self, path: Path) -> str:
        """How to name a package file: its path, or ``<zip>!/<member>`` for a package from a zip."""
        if self.archive is None or self.extracted is None:
            return str(path)
        try:
            return f"{self.archive}!/{PurePosixPath(path.relative_to(self.extracted))}"
        except ValueError:
            return str(path)

    @property
    def label(self) -> str:
        """The package as the user named it: the zip, or the yaml."""
        return str(self.archive) if self.archive is not None else str(self.rdf)

    def file(self, source: str) -> Path | None:
        """The package file ``source`` names (None when absent or a URL); refused when outside the package."""
        if not source or _is_url(source):
            return None
        pure = source.replace("\\", "/")
        outside = pure.startswith("/") or re.match(r"^[A-Za-z]:", pure) or ".." in pure.split("/")
        p = self.root / source
        if not outside:
            try:
                p.resolve().relative_to(self.root.resolve())
            except ValueError:
                outside = True
        if outside:
            raise ModelLoadError(
                f"{self.where(self.rdf)} names the file '{source}', which is outside the package folder "
                f"({p.resolve()}): a package may only use its own files",
                "use the package as it was published (re-download it); a description that points at files "
                "elsewhere was not written by bioimage.io tools",
            )
        return p if p.is_file() else None

    def declared_checksums(self) -> list[tuple[str, str, str]]:
        """(the key holding the sha256, file, sha256) for every checksum the description declares."""
        out: list[tuple[str, str, str]] = []

        def walk(node: Any, where: str) -> None:
            if isinstance(node, dict):
                src, digest = node.get("source"), node.get("sha256")
                if isinstance(src, str) and isinstance(digest, str):
                    out.append((f"{where}.sha256" if where else "sha256", src, digest))
                for k, v in node.items():
                    walk(v, f"{where}.{k}" if where else str(k))
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}[{i}]")

        walk(self.doc, "")
        # format 0.4: the architecture ("file.py:Callable") and its checksum sit side by side in the entry
        for fmt, entry in (self.doc.get("weights") or {}).items():
            if not isinstance(entry, dict):
                continue
            arch, digest = entry.get("architecture"), entry.get("architecture_sha256")
            if isinstance(arch, str) and isinstance(digest, str):
                src = arch.rpartition(":")[0]
                if src.endswith(".py"):
                    out.append((f"weights.{fmt}.architecture_sha256", src, digest))
        return out

    def verify_checksums(self) -> dict[str, Any]:
        """Check every declared sha256 of a file in the package; ``{"verified": [files]}`` or an error."""
        verified: list[str] = []
        for key, source, digest in self.declared_checksums():
            path = self.file(source)
            if path is None or source in verified:
                continue  # a URL, or not in the package (what needs it says so)
            actual = sha256(path)
            if actual != digest.strip().lower():
                raise ModelLoadError(
                    f"{self.where(path)} does not match the checksum the package's description declares for "
                    f"it ({key}: expected {digest.strip()}, the file has {actual}); nothing was loaded from "
                    "the package",
                    REDOWNLOAD,
                )
            verified.append(source)
        return {"verified": verified}

    def is_verified(self, source: str | None) -> bool:
        return bool(source) and source in self.checksums["verified"]

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
        """(format, weights entry, (constructor, kwargs) for pytorch_state_dict else None).

        ``self.skipped`` lists why formats earlier in the order were not used.
        """
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
            arch = None
            if fmt == "pytorch_state_dict":
                arch, why = self._architecture(entry)
                if arch is None:
                    reasons.append(f"{fmt}: {why}")
                    continue
            self.skipped = reasons
            return fmt, entry, arch
        raise ModelLoadError(
            f"{self.label}: no usable weights ({'; '.join(reasons)})",
            "choose another format with model.weights, or download the weights into the package folder",
        )

    def architecture_source(self, entry: dict[str, Any]) -> str | None:
        """The package file holding the ``pytorch_state_dict`` architecture (None when imported by name)."""
        arch = entry.get("architecture")
        if isinstance(arch, dict):
            return arch.get("source")
        if isinstance(arch, str) and arch.rpartition(":")[0].endswith(".py"):
            return arch.rpartition(":")[0]
        return None

    def _architecture(self, entry: dict[str, Any]) -> tuple[Any, str]:
        """((constructor, kwargs), "") for ``pytorch_state_dict`` weights, or (None, why it is unavailable).

        Only called after :meth:`verify_checksums`: an architecture source whose checksum the
        description declares is run only when it matched.
        """
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
            return None, f"no architecture is described ({arch!r})"
        label = f"architecture '{source or import_from}:{callable_name}'"
        if source:
            path = self.file(source)
            if path is None:
                return None, f"{label}: the source file '{source}' is not in the package"
        try:
            if source:
                spec = importlib.util.spec_from_file_location(f"_bioimageio_arch_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(import_from)
        except Exception as exc:
            checked = (
                " (the file matches its declared sha256: it is the published code, and it fails here, e.g. "
                "because a package it imports is not installed)"
                if source and self.is_verified(source)
                else ""
            )
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            return (
                None,
                f"{label} is not importable: importing it raised {type(exc).__name__}: {detail}{checked}",
            )
        if not hasattr(module, str(callable_name)):
            return None, f"{label}: '{source or import_from}' has no '{callable_name}'"
        fn = getattr(module, callable_name)
        if not source and not _is_module_class(fn):
            # code from the environment named by the description: only a network class is called, never an
            # arbitrary function with the description's kwargs
            return None, f"{label} is not a torch.nn.Module class, so it is not called"
        return (fn, kwargs), ""


def _is_module_class(obj: Any) -> bool:
    import torch

    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


def _weights_unreadable(pkg: Package, fmt: str, path: Path, exc: ModelLoadError) -> ModelLoadError:
    detail = exc.problem.partition("(")[2].rpartition(")")[0] or exc.problem
    declared = (
        "the package's description declares no sha256 for it, so the damage was not caught earlier"
        if not pkg.is_verified(_source_of(pkg, path))
        else "it matches its declared sha256, so the package was published this way"
    )
    return ModelLoadError(
        f"{pkg.where(path)}: the package's {fmt} weights cannot be read: the file is truncated or corrupt "
        f"({detail}); {declared}",
        "re-download the package from where it was published (bioimage.io / Zenodo), or choose another weights "
        "format of the package with model.weights (e.g. onnx)",
    )


def _source_of(pkg: Package, path: Path) -> str:
    return str(PurePosixPath(path.relative_to(pkg.root)))


@register_parser("bioimageio")
class BioImageIOParser(BaseParser):
    """A bioimage.io model package; axes, halo, tile sizes and processing come from the package."""

    def load(self) -> LoadedModel:
        from efficientbioai.models.onnx_file import make_dynamic, read_onnx
        from efficientbioai.models.pytorch import build, fit_state_dict, load_torchscript, read_state_dict

        pkg = open_package(Path(self.config.path))  # every declared checksum verified here
        axes = pkg.axes()
        fmt, entry, arch = pkg.weights(self.config.weights)
        for why in pkg.skipped:
            if "raised" in why:
                warnings.warn(
                    f"{pkg.label}: {why}; using the {fmt} weights instead", UserWarning, stacklevel=2
                )
        weights_path = pkg.file(entry["source"])
        module = onnx_path = None
        try:
            if fmt == "torchscript":
                module = load_torchscript(weights_path)
            elif fmt == "pytorch_state_dict":
                state = read_state_dict(weights_path)
            else:
                onnx_model = read_onnx(weights_path)
        except ModelLoadError as exc:
            raise _weights_unreadable(pkg, fmt, weights_path, exc) from exc
        if fmt == "pytorch_state_dict":
            fn, kwargs = arch
            module = fit_state_dict(
                build(fn, kwargs, "the package architecture"), state, weights_path, "the package"
            )
        elif fmt == "onnx":
            onnx_path = scratch_dir("onnx") / "dynamic.onnx"
            make_dynamic(weights_path, onnx_path, axes, model=onnx_model)
        tile_min, tile_step, preferred = pkg.sizes()
        ins, outs = pkg.test_tensors()
        used = [entry["source"]]
        if fmt == "pytorch_state_dict" and pkg.architecture_source(entry):
            used.append(pkg.architecture_source(entry))
        source = {
            "path": str(self.config.path),
            **({"package": str(pkg.archive)} if pkg.archive is not None else {}),
            "rdf": pkg.where(pkg.rdf),
            "format_version": pkg.version,
            "weights": fmt,
            "weights_file": pkg.where(weights_path),
            "weights_bytes": weights_path.stat().st_size,
            "sha256": sha256(weights_path),
            # the files this model was built from were checked against the description's checksums
            "checksums_verified": all(pkg.is_verified(u) for u in used),
            "checksums": {
                "verified": pkg.checksums["verified"],
                "not_declared": [u for u in used if not pkg.is_verified(u)],
            },
        }
        passed_over = [why for why in pkg.skipped if "not in the package" not in why]
        if passed_over:  # a format that is there but could not be used (its architecture failed, …)
            source["weights_skipped"] = passed_over
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
            source=source,
        )
