"""File-system side of reading and writing: image suffixes, output names, atomic replacement.

Every write goes to a hidden temporary sibling (``.<name>.partial-<random>``) that is renamed into place
only once complete, so an interrupted run never leaves a file or store that looks finished.
:func:`partial_outputs` lists the leftovers of runs that were killed before they could clean up,
:func:`remove_partials` deletes them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from efficientbioai.errors import EfficientBioAIError

IMAGE_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")


# Files that mark a folder as a zarr store (v2 array / group / attributes, v3 node).
ZARR_METADATA = (".zarray", ".zgroup", "zarr.json", ".zattrs")


# Suffixes :func:`output_path` strips from an input name, longest first.
STEM_SUFFIXES = (".ome.tiff", ".ome.zarr", ".ome.tif", ".tiff", ".zarr", ".tif", ".npy")


FORMATS = {"tif": "tiff", "tiff": "tiff", "zarr": "zarr", "npy": "npy"}


SUFFIX_FORMATS = {".tif": "tiff", ".tiff": "tiff", ".zarr": "zarr", ".npy": "npy"}


# Axis letters written into files and returned by read_axes: time, channel, z, y, x.
WRITE_AXES = "tczyx"


TOKEN_CHARS = 16


PARTIAL_RE = re.compile(rf"^\..+\.(partial|replaced)-[0-9a-f]{{{TOKEN_CHARS}}}$")


def is_zarr_store(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a zarr store (named ``*.zarr`` or containing zarr metadata)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return path.suffix.lower() == ".zarr" or any((path / name).is_file() for name in ZARR_METADATA)


def output_path(input_path: str | Path, output_dir: str | Path, fmt: str) -> Path:
    """Where the result for ``input_path`` goes: ``<output_dir>/<input stem><.tif|.ome.tif|.zarr>``.

    The stem is the input name without ``.ome.tif``, ``.ome.tiff``, ``.ome.zarr``, ``.tif``, ``.tiff``,
    ``.zarr`` or ``.npy`` (matched case-insensitively; other names are kept whole). ``fmt`` is ``"tiff"``
    (or ``"tif"``) or ``"zarr"``; a TIFF result of an OME-TIFF input is an OME-TIFF (``.ome.tif``).
    Refuses a destination that is the input itself.
    """
    kind = FORMATS.get(str(fmt).lower())
    if kind not in ("tiff", "zarr"):
        raise EfficientBioAIError(
            f"unknown output format '{fmt}'",
            "use 'tiff' (one .tif file per image) or 'zarr' (one .zarr store per image)",
        )
    stem = name_stem(Path(input_path).name)
    suffix = ".zarr" if kind == "zarr" else ".ome.tif" if is_ome_tiff(Path(input_path)) else ".tif"
    out = Path(output_dir).expanduser() / (stem + suffix)
    if out.resolve() == Path(input_path).expanduser().resolve():
        raise EfficientBioAIError(
            f"the output for {input_path} would overwrite the input itself ({out})",
            "choose an output folder other than the input folder, or another output format",
        )
    return out


def partial_outputs(output_dir: str | Path) -> list[Path]:
    """Leftovers of interrupted :func:`write_image` calls in ``output_dir`` (not its subfolders), sorted.

    These are temporaries (``.<name>.partial-<random>``) and outputs that were being replaced
    (``.<name>.replaced-<random>``); none of them is a finished output.
    """
    folder = Path(output_dir).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if PARTIAL_RE.match(p.name))


def remove_partials(output_dir: str | Path) -> list[Path]:
    """Delete :func:`partial_outputs` of ``output_dir`` and return what was removed.

    Only call this when no other process is writing into ``output_dir``: its temporaries would go too.
    """
    removed = partial_outputs(output_dir)
    for leftover in removed:
        remove_path(leftover)
    return removed


def output_format(path: Path, fmt: str | None) -> str:
    from_suffix = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        if from_suffix is None:
            raise EfficientBioAIError(
                f"cannot tell the image format to write from the name {path}",
                "end the name in .tif, .tiff, .zarr or .npy, or pass the format",
            )
        return from_suffix
    kind = FORMATS.get(fmt.lower())
    if kind is None:
        raise EfficientBioAIError(f"unknown image format '{fmt}' for {path}", "use 'tiff', 'zarr' or 'npy'")
    if from_suffix is not None and from_suffix != kind:
        raise EfficientBioAIError(
            f"{path}: the name ends in '{path.suffix}' but the format asked for is '{fmt}'",
            "make the suffix match the format, or leave the format out to take it from the suffix",
        )
    return kind


def is_ome_tiff(path: Path) -> bool:
    return path.name.lower().endswith((".ome.tif", ".ome.tiff"))


def name_stem(name: str) -> str:
    for suffix in STEM_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def check_replaceable(path: Path) -> None:
    """Refuse to replace a folder that is not a zarr store: it may hold the user's own files."""
    if path.is_dir() and not path.is_symlink():
        holds_zarr = any((path / name).is_file() for name in ZARR_METADATA)
        if not holds_zarr and any(path.iterdir()):
            raise EfficientBioAIError(
                f"{path} is an existing folder that is not a zarr store; refusing to replace it",
                "choose another output folder or name, or move that folder away",
            )


def make_umask_mode(path: Path) -> None:
    """Give a folder made by ``tempfile.mkdtemp`` (always 0700) the mode the user's umask gives new
    folders, so that a result moved into place is as readable as any folder they make."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def move_into_place(tmp: Path, dest: Path) -> None:
    if not tmp.is_dir() and not (dest.is_dir() and not dest.is_symlink()):
        os.replace(tmp, dest)  # a file over a file (or nothing): atomic
        return
    # Folders cannot be renamed over a non-empty folder: move the old one aside, move the new one in,
    # then delete the old one (restoring it if the move in fails).
    check_replaceable(dest)
    aside = None
    if os.path.lexists(dest):
        aside = dest.with_name(f".{dest.name[:200]}.replaced-{secrets.token_hex(TOKEN_CHARS // 2)}")
        os.replace(dest, aside)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if aside is not None:
            os.replace(aside, dest)
        raise
    if aside is not None:
        remove_path(aside)


def remove_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file grew over the size limit"}
if hasattr(errno, "EDQUOT"):
    DISK_ERRNOS[errno.EDQUOT] = "the disk quota is exhausted"


def disk_full(exc: BaseException) -> OSError | None:
    """The out-of-space error (disk full, quota, file size limit) behind ``exc``, if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_error(exc: OSError, what: str = "the output") -> EfficientBioAIError:
    """A clear error for an out-of-space ``exc`` met while writing ``what``."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return EfficientBioAIError(
        f"writing {what} failed: {DISK_ERRNOS[exc.errno]}{where}",
        "free some disk space (or raise the quota / file size limit), or write to another disk; "
        "nothing half-written was left in place, so run the same command again",
    )


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` (with its parents) and check that files can be made in it, before any work.

    A probe file is made and removed (``os.access`` is wrong for root, ACLs and read-only mounts)."""
    fix = f"choose a {what} in a folder you may write to, or fix the folder's permissions"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EfficientBioAIError(
            f"{what}: cannot create the folder {folder} ({type(exc).__name__}: {exc.strerror or exc})", fix
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".efficientbioai-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EfficientBioAIError(
            f"{what}: cannot write in {folder} ({type(exc).__name__}: {exc.strerror or exc})", fix
        ) from None
