"""No foreign code or data (issue 22, item 3): bad packages, artifacts and exports are refused.

Each case builds one bad input in ``tmp_path`` from a tiny bioimage.io package made here (a two-layer
network, its architecture source, state dict, ONNX weights and test tensors, every file with its declared
sha256) or from one artifact compressed from that package's zip per module, and checks that the refusal
names the problem and the fix, that nothing was written (or an existing output is intact) and that no
foreign code ran (a tampered architecture writes a marker file when it runs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from efficientbioai.artifact import Artifact, write_manifest
from efficientbioai.config import ModelConfig
from efficientbioai.errors import EfficientBioAIError, ModelLoadError
from efficientbioai.models import load_model

from .conftest import blobs, run_cli

needs_spec = pytest.mark.skipif(
    importlib.util.find_spec("bioimageio") is None or importlib.util.find_spec("bioimageio.spec") is None,
    reason='pip install "efficientbioai[bioimageio]"',
)

ARCH_PY = """import torch


class TinyNet(torch.nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.a = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.b = torch.nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
"""


def foreign_code(marker: Path) -> str:
    """Python that leaves ``marker`` behind when it runs: the proof that foreign code ran."""
    return f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('foreign code ran')\n"


def _tiny_net() -> torch.nn.Module:
    namespace: dict = {}
    exec(ARCH_PY, namespace)
    torch.manual_seed(0)
    return namespace["TinyNet"](3).eval()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _space(a: str) -> dict:
    return {"type": "space", "id": a, "size": {"min": 16, "step": 8}}


def _out_space(a: str) -> dict:
    return {"type": "space", "id": a, "size": {"tensor_id": "raw", "axis_id": a}}


def build_package(root: Path, version: str = "0.5") -> Path:
    """A tiny bioimage.io package (format 0.5 or 0.4) with every checksum declared."""
    root.mkdir(parents=True)
    net = _tiny_net()
    (root / "tiny_arch.py").write_text(ARCH_PY)
    torch.save(net.state_dict(), root / "weights.pt")
    x = blobs((64, 64), seed=3)[0][None, None]
    with torch.no_grad():
        y = torch.sigmoid(net(torch.from_numpy(x))).numpy()
    np.save(root / "test_input.npy", x)
    np.save(root / "test_output.npy", y)
    torch.onnx.export(net, torch.from_numpy(x), str(root / "weights.onnx"), opset_version=17, dynamo=False)
    if version == "0.4":
        rdf = {
            "format_version": "0.4.10",
            "type": "model",
            "name": "tiny 0.4",
            "inputs": [
                {"name": "raw", "axes": "bcyx", "data_type": "float32",
                 "shape": {"min": [1, 1, 16, 16], "step": [0, 0, 8, 8]}}
            ],
            "outputs": [
                {"name": "out", "axes": "bcyx", "data_type": "float32",
                 "shape": {"reference_tensor": "raw", "scale": [1, 1, 1, 1], "offset": [0, 0, 0, 0]},
                 "postprocessing": [{"name": "sigmoid"}]}
            ],
            "test_inputs": ["test_input.npy"],
            "test_outputs": ["test_output.npy"],
            "weights": {
                "pytorch_state_dict": {
                    "source": "weights.pt",
                    "sha256": _sha(root / "weights.pt"),
                    "architecture": "tiny_arch.py:TinyNet",
                    "architecture_sha256": _sha(root / "tiny_arch.py"),
                    "kwargs": {"channels": 3},
                }
            },
        }  # fmt: skip
    else:
        rdf = {
            "format_version": "0.5.4",
            "type": "model",
            "name": "tiny",
            "license": "MIT",
            "inputs": [
                {
                    "id": "raw",
                    "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]}, _space("y"), _space("x")],
                    "test_tensor": {"source": "test_input.npy", "sha256": _sha(root / "test_input.npy")},
                }
            ],
            "outputs": [
                {
                    "id": "out",
                    "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["p"]}, _out_space("y"), _out_space("x")],
                    "test_tensor": {"source": "test_output.npy", "sha256": _sha(root / "test_output.npy")},
                    "postprocessing": [{"id": "sigmoid"}],
                }
            ],
            "weights": {
                "pytorch_state_dict": {
                    "source": "weights.pt",
                    "sha256": _sha(root / "weights.pt"),
                    "architecture": {
                        "source": "tiny_arch.py",
                        "sha256": _sha(root / "tiny_arch.py"),
                        "callable": "TinyNet",
                        "kwargs": {"channels": 3},
                    },
                },
                "onnx": {"source": "weights.onnx", "sha256": _sha(root / "weights.onnx"), "opset_version": 17},
            },
        }  # fmt: skip
    (root / "bioimageio.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return root


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
    return archive


def read_rdf(pkg: Path) -> dict:
    return yaml.safe_load((pkg / "bioimageio.yaml").read_text())


def write_rdf(pkg: Path, doc: dict) -> None:
    (pkg / "bioimageio.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def redeclare(pkg: Path, source: str) -> None:
    """Put the current sha256 of ``source`` into the description (a package changed by its author)."""
    doc = read_rdf(pkg)

    def walk(node):
        if isinstance(node, dict):
            if node.get("source") == source and "sha256" in node:
                node["sha256"] = _sha(pkg / source)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    write_rdf(pkg, doc)


def undeclare(pkg: Path) -> None:
    """Remove every sha256 from the description (allowed: many packages have none)."""

    def walk(node):
        if isinstance(node, dict):
            node.pop("sha256", None)
            node.pop("architecture_sha256", None)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    doc = read_rdf(pkg)
    walk(doc)
    write_rdf(pkg, doc)


def load(path: Path, **kwargs):
    return load_model(ModelConfig(kind="bioimageio", path=path, **kwargs))[1]


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return build_package(tmp_path_factory.mktemp("tiny_package") / "pkg")


@pytest.fixture
def pkg(package, tmp_path) -> Path:
    """A copy of the tiny package to damage."""
    return Path(shutil.copytree(package, tmp_path / "pkg"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "FOREIGN_CODE_RAN"


def _compress_cfg(tmp_path: Path, model_path: Path, output: Path) -> Path:
    cfg = {
        "model": {"kind": "bioimageio", "path": str(model_path)},
        "calibration": {"num_tiles": 4, "tile_shape": [32, 32]},
        "quantize": {"precision": "int8", "max_drop": None},
        "fidelity": {"num_tiles": 2},
        "engine": {"latency_repeats": 2},
        "output": str(output),
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_refused(proc, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert "how to fix:" in proc.stderr


# ---------------------------------------------------------------------------------- declared checksums


def _append_code(pkg: Path, marker: Path) -> None:
    with open(pkg / "tiny_arch.py", "a") as f:
        f.write(foreign_code(marker))


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


DECLARED = [
    pytest.param(_append_code, "tiny_arch.py", "weights.pytorch_state_dict.architecture.sha256", id="architecture-py"),
    pytest.param(lambda p, m: _flip_bytes(p / "weights.pt"), "weights.pt", "weights.pytorch_state_dict.sha256", id="state-dict"),
    pytest.param(lambda p, m: _flip_bytes(p / "weights.onnx"), "weights.onnx", "weights.onnx.sha256", id="unused-onnx"),
    pytest.param(lambda p, m: np.save(p / "test_output.npy", np.zeros((1, 1, 64, 64), np.float32)), "test_output.npy",
                 "outputs[0].test_tensor.sha256", id="test-tensor"),
]  # fmt: skip


@pytest.mark.parametrize("damage, name, key", DECLARED)
def test_file_that_does_not_match_its_declared_sha256_is_refused_before_anything_runs(
    pkg, marker, damage, name, key
):
    declared = _declared_sha(read_rdf(pkg), name)
    damage(pkg, marker)
    with pytest.raises(ModelLoadError) as err:
        load(pkg)
    problem, fix = err.value.problem, err.value.fix
    assert name in problem and key in problem and declared in problem and _sha(pkg / name) in problem
    assert "re-download" in fix and "modified" in fix
    assert not marker.exists()


def _declared_sha(node, source: str) -> str | None:
    """The sha256 the description declares for ``source``."""
    if isinstance(node, dict):
        if node.get("source") == source and "sha256" in node:
            return node["sha256"]
        node = list(node.values())
    if isinstance(node, list):
        return next((d for d in (_declared_sha(v, source) for v in node) if d), None)
    return None


def test_tampered_architecture_is_not_run_by_compress(pkg, marker, tmp_path):
    """The real CLI: a package whose architecture source was changed never imports it."""
    _append_code(pkg, marker)
    out = tmp_path / "art"
    proc = run_cli("compress", "--config", str(_compress_cfg(tmp_path, pkg, out)), cwd=tmp_path)
    assert_refused(proc, "tiny_arch.py", "expected", "re-download")
    assert not marker.exists() and not out.exists()


def test_corrupted_weights_are_not_compressed(pkg, tmp_path):
    _flip_bytes(pkg / "weights.pt")
    out = tmp_path / "art"
    proc = run_cli("compress", "--config", str(_compress_cfg(tmp_path, pkg, out)), cwd=tmp_path)
    assert_refused(proc, "weights.pt", "does not match the checksum", "re-download")
    assert not out.exists()


def test_format_04_architecture_sha256_is_checked(tmp_path, marker):
    pkg = build_package(tmp_path / "pkg04", version="0.4")
    loaded = load(pkg)
    assert loaded.source["checksums_verified"] is True
    assert {"weights.pt", "tiny_arch.py"} <= set(loaded.source["checksums"]["verified"])
    _append_code(pkg, marker)
    with pytest.raises(ModelLoadError, match=r"architecture_sha256: expected") as err:
        load(pkg)
    assert "tiny_arch.py" in err.value.problem and not marker.exists()


def test_missing_checksums_are_allowed_and_recorded(pkg):
    undeclare(pkg)
    loaded = load(pkg)
    assert loaded.source["weights"] == "pytorch_state_dict"
    assert loaded.source["checksums_verified"] is False
    assert loaded.source["checksums"] == {"verified": [], "not_declared": ["weights.pt", "tiny_arch.py"]}


def test_declared_checksums_verified_are_recorded(package):
    loaded = load(package)
    assert loaded.source["checksums_verified"] is True
    assert set(loaded.source["checksums"]["verified"]) == {
        "test_input.npy", "test_output.npy", "weights.pt", "tiny_arch.py", "weights.onnx"
    }  # fmt: skip
    assert loaded.source["checksums"]["not_declared"] == []


def test_verified_architecture_that_raises_on_import_says_why(pkg):
    (pkg / "tiny_arch.py").write_text("import efficientbioai_no_such_module\n" + ARCH_PY)
    redeclare(pkg, "tiny_arch.py")  # as published: the checksum matches
    with pytest.warns(UserWarning, match="ModuleNotFoundError.*efficientbioai_no_such_module"):
        loaded = load(pkg)
    assert loaded.source["weights"] == "onnx"  # the fallback is kept …
    assert "raised ModuleNotFoundError" in loaded.source["weights_skipped"][0]  # … and its reason recorded
    with pytest.raises(ModelLoadError) as err:
        load(pkg, weights="pytorch_state_dict")
    assert (
        "raised ModuleNotFoundError" in err.value.problem
        and "efficientbioai_no_such_module" in err.value.problem
    )
    assert "matches its declared sha256" in err.value.problem


def _outside_architecture(pkg: Path, marker: Path) -> None:
    (pkg.parent / "evil.py").write_text(ARCH_PY + foreign_code(marker))
    doc = read_rdf(pkg)
    arch = doc["weights"]["pytorch_state_dict"]["architecture"]
    arch["source"], arch["sha256"] = "../evil.py", _sha(pkg.parent / "evil.py")
    write_rdf(pkg, doc)


def _absolute_weights(pkg: Path, marker: Path) -> None:
    shutil.copyfile(pkg / "weights.pt", pkg.parent / "elsewhere.pt")
    doc = read_rdf(pkg)
    doc["weights"]["pytorch_state_dict"]["source"] = str(pkg.parent / "elsewhere.pt")
    doc["weights"]["pytorch_state_dict"]["sha256"] = _sha(pkg.parent / "elsewhere.pt")
    write_rdf(pkg, doc)


def _linked_architecture(pkg: Path, marker: Path) -> None:
    (pkg.parent / "evil.py").write_text(ARCH_PY + foreign_code(marker))
    (pkg / "tiny_arch.py").unlink()
    (pkg / "tiny_arch.py").symlink_to(pkg.parent / "evil.py")
    redeclare(pkg, "tiny_arch.py")


@pytest.mark.parametrize(
    "damage, named",
    [
        pytest.param(_outside_architecture, "'../evil.py'", id="dotdot-architecture"),
        pytest.param(_absolute_weights, "elsewhere.pt", id="absolute-weights"),
        pytest.param(_linked_architecture, "'tiny_arch.py'", id="symlinked-architecture"),
    ],
)
def test_files_outside_the_package_are_refused(pkg, marker, damage, named):
    damage(pkg, marker)
    with pytest.raises(ModelLoadError, match="outside the package folder") as err:
        load(pkg, weights="pytorch_state_dict")
    assert named in err.value.problem and "re-download" in err.value.fix
    assert not marker.exists()


def test_architecture_imported_by_name_must_be_a_network_class(pkg, marker):
    """``import_from`` cannot turn the description into a call of an arbitrary function."""
    doc = read_rdf(pkg)
    doc["weights"]["pytorch_state_dict"]["architecture"] = {
        "import_from": "subprocess", "callable": "run", "kwargs": {"args": ["touch", str(marker)]}
    }  # fmt: skip
    write_rdf(pkg, doc)
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module class"):
        load(pkg, weights="pytorch_state_dict")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ zips


def _bad_member(name: str, symlink: bool = False):
    def add(zf: zipfile.ZipFile) -> None:
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if symlink else "x")

    return add


@pytest.mark.parametrize(
    "add, problem",
    [
        pytest.param(_bad_member("../evil.txt"), "a '..' component", id="dotdot"),
        pytest.param(_bad_member("sub/../../evil.txt"), "a '..' component", id="nested-dotdot"),
        pytest.param(_bad_member("/tmp/evil.txt"), "an absolute path", id="absolute"),
        pytest.param(_bad_member("C:/evil.txt"), "an absolute path", id="drive-letter"),
        pytest.param(_bad_member("link.yaml", symlink=True), "a symbolic link", id="symlink"),
    ],
)
def test_zip_members_that_leave_the_package_are_refused(package, tmp_path, add, problem):
    archive = zip_folder(package, tmp_path / "pkg.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        add(zf)
    with pytest.raises(ModelLoadError) as err:
        load(archive)
    assert problem in err.value.problem and "nothing was extracted" in err.value.problem
    assert str(archive) in err.value.problem and "re-download" in err.value.fix
    assert not (tmp_path / "evil.txt").exists()


def test_zip_package_facts_name_the_zip(package, tmp_path):
    archive = zip_folder(package, tmp_path / "pkg.zip")
    src = load(archive).source
    assert src["package"] == str(archive.resolve())
    assert src["rdf"] == f"{archive.resolve()}!/bioimageio.yaml"
    assert src["weights_file"] == f"{archive.resolve()}!/weights.pt"
    assert not any("efficientbioai-bioimageio-" in str(v) for v in src.values())  # no temporary folder


# ------------------------------------------------------------------------------------- other messages


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(lambda t: _png(t / "cover.png"), "is a .png file, not a bioimage.io package", id="png"),
        pytest.param(lambda t: (t / "rdf.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff") and t / "rdf.yaml",
                     "is not a text file", id="binary-yaml"),
        pytest.param(lambda t: (t / "pkg.zip").write_bytes(b"not a zip") and t / "pkg.zip",
                     "is not a valid zip archive", id="bad-zip"),
    ],
)  # fmt: skip
def test_model_path_that_is_not_a_package(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError, match=message) as err:
        load(path)
    assert err.value.fix


def test_png_as_package_through_the_cli(tmp_path):
    out = tmp_path / "art"
    cfg = _compress_cfg(tmp_path, _png(tmp_path / "cover.png"), out)
    proc = run_cli("compress", "--config", str(cfg), cwd=tmp_path)
    assert_refused(proc, "is a .png file, not a bioimage.io package", "bioimageio.yaml")
    assert not out.exists()


def _torchscript_only(pkg: Path) -> None:
    torch.jit.save(torch.jit.trace(_tiny_net(), torch.zeros(1, 1, 16, 16)), pkg / "weights_ts.pt")
    doc = read_rdf(pkg)
    doc["weights"] = {"torchscript": {"source": "weights_ts.pt"}}
    write_rdf(pkg, doc)


@pytest.mark.parametrize(
    "fmt, file", [("pytorch_state_dict", "weights.pt"), ("onnx", "weights.onnx"), ("torchscript", "weights_ts.pt")]
)  # fmt: skip
def test_truncated_weights_say_truncated_and_re_download(pkg, fmt, file):
    if fmt == "torchscript":
        _torchscript_only(pkg)
    undeclare(pkg)  # no checksum to catch it first
    data = (pkg / file).read_bytes()
    (pkg / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as err:
        load(pkg, weights=fmt)
    assert "truncated or corrupt" in err.value.problem and file in err.value.problem
    assert "re-download" in err.value.fix and "kind 'torch'" not in err.value.fix


def _nan_state_dict(pkg: Path, tmp_path: Path) -> tuple[dict, str]:
    state = torch.load(pkg / "weights.pt", weights_only=True)
    state["a.weight"][0, 0, 1, 1] = float("nan")
    torch.save(state, pkg / "weights.pt")
    redeclare(pkg, "weights.pt")
    return {"kind": "bioimageio", "path": pkg}, "'a.weight'"


def _inf_torchscript(pkg: Path, tmp_path: Path) -> tuple[dict, str]:
    net = _tiny_net()
    with torch.no_grad():
        net.b.bias[0] = float("inf")
    torch.jit.save(torch.jit.trace(net, torch.zeros(1, 1, 16, 16)), tmp_path / "net.pt")
    return {"kind": "torchscript", "path": tmp_path / "net.pt", "axes": "bcyx"}, "'b.bias'"


def _nan_onnx(pkg: Path, tmp_path: Path) -> tuple[dict, str]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(pkg / "weights.onnx"))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 4)
    values = numpy_helper.to_array(init).copy()
    values.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(tmp_path / "net.onnx"))
    return {"kind": "onnx", "path": tmp_path / "net.onnx", "axes": "bcyx"}, f"'{init.name}'"


@pytest.mark.parametrize(
    "make", [_nan_state_dict, _inf_torchscript, _nan_onnx], ids=["state-dict", "torchscript", "onnx"]
)
def test_non_finite_weights_are_refused_naming_the_parameter(pkg, tmp_path, make):
    spec, name = make(pkg, tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(**spec))
    assert "not finite" in err.value.problem and name in err.value.problem
    assert "re-download or re-export" in err.value.fix


def test_non_finite_weights_through_the_cli(pkg, tmp_path):
    _nan_state_dict(pkg, tmp_path)
    out = tmp_path / "art"
    proc = run_cli("compress", "--config", str(_compress_cfg(tmp_path, pkg, out)), cwd=tmp_path)
    assert_refused(proc, "not finite", "'a.weight'", "NaN")
    assert not out.exists()


class MaskedNet(torch.nn.Module):
    """A network with a -inf mask buffer: a legitimate infinite value, not damage."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.register_buffer("mask", torch.full((1,), float("-inf")))

    def forward(self, x):
        return self.conv(x) + torch.exp(self.mask)


def make_masked():
    return MaskedNet()


def test_infinite_mask_buffer_is_not_damage():
    loaded = load_model(ModelConfig(kind="torch", factory=f"{__name__}:make_masked", axes="bcyx"))[1]
    assert loaded.module is not None


# ------------------------------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def compressed(package, tmp_path_factory) -> Path:
    """One artifact per module, compressed from the tiny package's zip (copy it before damaging it)."""
    from efficientbioai.compress import compress
    from efficientbioai.config import CompressConfig, load_config

    root = tmp_path_factory.mktemp("compressed")
    archive = zip_folder(package, root / "tiny.zip")
    tifffile.imwrite(root / "sample.tif", blobs((80, 80), seed=7)[0])
    cfg = load_config(_compress_cfg(root, archive, root / "art"), CompressConfig, {})
    with pytest.warns(UserWarning):
        compress(cfg, quiet=True)
    return root / "art"


@pytest.fixture
def art(compressed, tmp_path) -> Path:
    return Path(shutil.copytree(compressed, tmp_path / "art", symlinks=True))


def _raw(a: Path) -> dict:
    return yaml.safe_load((a / "manifest.yaml").read_text())


def resign(a: Path, edit=None) -> None:
    """Rewrite the manifest consistently (its files' checksums and manifest.sha256), after ``edit``.

    What someone who changes an artifact on purpose and covers their tracks would do: only the path checks
    and the export's reproduction check can catch it.
    """
    data = _raw(a)
    data["files"] = {rel: _sha(a / rel) for rel in data["files"]}
    if edit is not None:
        edit(data)
    write_manifest(a, data)


def test_compressed_zip_package_records_the_zip(compressed):
    a = Artifact(compressed)
    archive = str(compressed.parent / "tiny.zip")
    m = a.manifest.model
    assert m.config["path"] == archive and m.fact("package") == archive
    assert m.fact("rdf") == f"{archive}!/bioimageio.yaml" and m.fact("checksums_verified") is True
    assert (compressed / "manifest.sha256").read_text() == f"{a.checksum}  manifest.yaml\n"
    assert a.checksum == _sha(compressed / "manifest.yaml")
    a.verify()
    _, loaded = a.load_original()  # re-loaded from the zip, not from the temporary folder
    assert loaded.source["package"] == archive


def _edit_text(a: Path) -> None:
    path = a / "manifest.yaml"
    path.write_text(path.read_text().replace("precision: int8", "precision: fp32", 1))


def _set(*keys, value):
    def edit(data):
        node = data
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit


def _foreign_engine(a: Path) -> None:
    shutil.copytree(a / "openvino", a / "foreign")
    resign(a, _set("engines", "openvino", "path", value="foreign/model.xml"))


def _escaping_link(a: Path) -> None:
    outside = a.parent / "outside.bin"
    shutil.move(a / "openvino" / "model.bin", outside)
    (a / "openvino" / "model.bin").symlink_to(outside)  # same bytes: the checksum alone would pass


def _extra_file(data: dict) -> None:
    data["files"]["../outside.bin"] = "0" * 64


ARTIFACT_CASES = [
    pytest.param(_edit_text, ["manifest.yaml was edited after compress wrote it"], id="edited-manifest"),
    pytest.param(lambda a: (a / "manifest.yaml").write_text((a / "manifest.yaml").read_text().replace(
        "path: openvino/model.xml", "path: ../other/openvino/model.xml")),
        ["manifest.yaml was edited after compress wrote it"], id="edited-engine-path"),
    pytest.param(lambda a: resign(a, _set("engines", "openvino", "path", value="../other/openvino/model.xml")),
                 ["engines.openvino.path '../other/openvino/model.xml'", "climbs out"], id="dotdot-engine-path"),
    pytest.param(lambda a: resign(a, _set("engines", "onnx", "path", value="/tmp/model.onnx")),
                 ["engines.onnx.path '/tmp/model.onnx'", "absolute path"], id="absolute-engine-path"),
    pytest.param(lambda a: resign(a, _extra_file), ["files['../outside.bin']", "climbs out"], id="dotdot-files-key"),
    pytest.param(lambda a: resign(a, _set("engines", "tensorrt",
                                          value={"backend": "tensorrt", "precision": "int8", "onnx": "../x.onnx"})),
                 ["engines.tensorrt.onnx '../x.onnx'"], id="dotdot-tensorrt"),
    pytest.param(_foreign_engine, ["engines.openvino.path 'foreign/model.xml'", "not one of the manifest's checksummed"],
                 id="unlisted-engine-file"),
    pytest.param(_escaping_link, ["openvino/model.bin", "a link out of the artifact directory"], id="escaping-symlink"),
    pytest.param(lambda a: (a / "manifest.sha256").unlink(), ["has no manifest.sha256", "older version"],
                 id="no-manifest-checksum"),
    pytest.param(lambda a: (a / "manifest.sha256").write_text("not a digest\n"), ["manifest.sha256 is damaged"],
                 id="damaged-manifest-checksum"),
]  # fmt: skip


@pytest.mark.parametrize("damage, fragments", ARTIFACT_CASES)
def test_damaged_artifact_is_refused_naming_key_and_path(art, damage, fragments):
    damage(art)
    with pytest.raises(EfficientBioAIError) as err:
        Artifact(art).open_engine("openvino")
    for fragment in fragments:
        assert fragment in err.value.problem
    assert "re-run `efficientbioai compress`" in err.value.fix


def test_engine_opens_only_after_its_exact_files_are_checked(art):
    a = Artifact(art)
    _flip_bytes(art / "openvino" / "model.bin")
    with pytest.raises(EfficientBioAIError, match=r"openvino/model.bin was changed after"):
        a.open_engine("openvino")
    with pytest.raises(EfficientBioAIError, match=r"model.bin was changed after"):
        a.verify()
    with a.open_engine("onnxruntime") as engine:  # model.onnx is intact
        assert engine(np.zeros((1, 1, 32, 32), np.float32)).shape == (1, 1, 32, 32)


def test_infer_refuses_an_edited_manifest(art, tmp_path):
    _edit_text(art)
    tifffile.imwrite(tmp_path / "img.tif", blobs((64, 64), seed=1)[0])
    out = tmp_path / "out"
    cfg = {"model": str(art), "input": str(tmp_path / "img.tif"), "output": str(out), "energy": False}
    (tmp_path / "i.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_cli("infer", "--config", str(tmp_path / "i.yaml"), cwd=tmp_path)
    assert_refused(
        proc, "manifest.yaml was edited after compress wrote it", "re-run `efficientbioai compress`"
    )
    assert not (out / "img.tif").exists()


# -------------------------------------------------------------------------------------------- export


def _tamper_onnx(path: Path, out: Path | None = None) -> None:
    """Replace every weight tensor of an ONNX file by other (seeded random) values of the same shape."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        if values.dtype.kind == "f":
            fake = rng.standard_normal(values.shape).astype(values.dtype)
            init.CopyFrom(numpy_helper.from_array(fake, init.name))
    onnx.save(model, str(out or path))


def _tamper_openvino(a: Path) -> None:
    import openvino as ov

    _tamper_onnx(a / "model.onnx", a.parent / "fake.onnx")
    ov.save_model(
        ov.convert_model(str(a.parent / "fake.onnx")),
        str(a / "openvino" / "model.xml"),
        compress_to_fp16=False,
    )


@needs_spec
def test_export_refuses_an_edited_manifest(art, tmp_path):
    _edit_text(art)
    out = tmp_path / "pkg.zip"
    proc = run_cli("export-bioimageio", "-a", str(art), "-o", str(out), cwd=tmp_path)
    assert_refused(
        proc, "manifest.yaml was edited after compress wrote it", "re-run `efficientbioai compress`"
    )
    assert not out.exists()


@needs_spec
def test_export_refuses_weights_that_do_not_reproduce_the_test_output(art, tmp_path):
    """model.onnx swapped and the manifest re-signed: every checksum matches, the output does not."""
    _tamper_onnx(art / "model.onnx")
    resign(art)
    Artifact(art).verify()  # the checksums cannot see it
    out = tmp_path / "pkg.zip"
    proc = run_cli("export-bioimageio", "-a", str(art), "-o", str(out), cwd=tmp_path)
    assert_refused(
        proc, "test output does not reproduce", "weights.onnx", "beyond the limits", "no package was written"
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg.zip")]


@needs_spec
@pytest.mark.parametrize("with_sample", [False, True], ids=["source-test-tensor", "sample"])
def test_export_refuses_an_engine_that_does_not_reproduce(art, compressed, tmp_path, with_sample):
    """The OpenVINO engine swapped (re-signed): checked against the source output, or the weights' output."""
    from efficientbioai.export_bioimageio import export_bioimageio

    _tamper_openvino(art)
    resign(art)
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("an existing package")
    sample = compressed.parent / "sample.tif" if with_sample else None
    with pytest.raises(EfficientBioAIError, match="compressed OpenVINO engine") as err:
        export_bioimageio(art, out, sample=sample, overwrite=True)
    against = "the weights' output" if with_sample else "the source package's test output"
    assert against in err.value.problem and "re-run `efficientbioai compress`" in err.value.fix
    assert (out / "keep.txt").read_text() == "an existing package"  # the existing output is intact


@needs_spec
def test_export_refuses_a_source_package_changed_after_compress(art, compressed, tmp_path):
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(compressed.parent / "tiny.zip") as zf:
        zf.extractall(folder)
    np.save(folder / "test_output.npy", np.zeros((1, 1, 64, 64), np.float32))
    archive = zip_folder(folder, tmp_path / "tiny.zip")

    def point_at_copy(data):
        data["model"]["package"] = data["model"]["path"] = data["model"]["config"]["path"] = str(archive)

    resign(art, point_at_copy)
    from efficientbioai.export_bioimageio import export_bioimageio

    with pytest.raises(ModelLoadError, match=r"test_output.npy does not match the checksum"):
        export_bioimageio(art, tmp_path / "pkg.zip")
    assert not (tmp_path / "pkg.zip").exists()


def _garbage_tif(t: Path) -> Path:
    (t / "bad.tif").write_bytes(b"II*\x00garbage")
    return t / "bad.tif"


@needs_spec
@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(lambda t: t / "missing.tif", "image not found", id="missing"),
        pytest.param(_garbage_tif, "holds no pixels", id="garbage-tif"),
        pytest.param(lambda t: _png(t / "s.png"), "unsupported image format", id="png"),
    ],
)
def test_export_sample_that_cannot_be_read(compressed, tmp_path, make, message):
    from efficientbioai.export_bioimageio import export_bioimageio

    sample = make(tmp_path)
    with pytest.raises(EfficientBioAIError) as err:
        export_bioimageio(compressed, tmp_path / "pkg.zip", sample=sample)
    assert f"--sample {sample}" in err.value.problem and message in err.value.problem
    assert err.value.fix and not (tmp_path / "pkg.zip").exists()


@needs_spec
def test_export_of_an_intact_artifact_records_its_check(compressed, tmp_path):
    """The control: the checks pass on what compress wrote (the source package found through its zip)."""
    from efficientbioai.export_bioimageio import export_bioimageio, reproduction_limit

    res = export_bioimageio(compressed, tmp_path / "pkg")
    assert res["test_output"] == "source package"
    check = res["rdf"]["config"]["efficientbioai"]["test_check"]
    assert check["against"] == "the source package's test output"
    assert check["weights_pearson"] > 0.9999 and check["engine_pearson"] >= check["limit"]
    assert check["limit"] == reproduction_limit(check["recorded_pearson"])
    proc = run_cli("export-bioimageio", "-a", str(compressed), "-o", str(tmp_path / "bad"), "--sample",
                   str(tmp_path / "nope.tif"), cwd=tmp_path)  # fmt: skip
    assert_refused(proc, "--sample", "image not found")
    assert not (tmp_path / "bad").exists()
