"""A network's outputs as they come: several of them, at another scale, smaller by a border, or not spatial.

The sliding window, the mergers (in memory, out of core, Dask), calibration, NNCF and every engine work on
one output tensor at the input's resolution. A network whose ``forward`` returns several tensors, or a
tensor at another scale, is therefore run as a *packed* network: each spatial output is brought onto the
input's pixel grid without losing or inventing a value, and the results are concatenated along channels:

- scale 1, smaller by ``2·b`` pixels (valid convolutions): padded by ``b`` with zeros; the halo grows to at
  least ``b`` so that the padding is always cropped away;
- scale ``k`` > 1 (super-resolution): each k×k block becomes ``k²`` channels (space-to-depth, a permutation);
- scale ``1/k`` (a half-size segmentation): each value is repeated over its k×k input block (nearest).

:func:`efficientbioai.packing.unpack` undoes it on the stitched output (depth-to-space, or the mean of each k×k block). Pearson
and relative L2 of a packed output equal those of the output itself (a permutation, or every value
repeated the same number of times), so the accuracy budget judges each output by its channel slice.

Outputs that are not spatial (a per-image style vector) cannot be tiled and blended: ``compress`` refuses
them by name, and ``model.drop_outputs`` leaves them out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from efficientbioai.errors import ModelLoadError
from efficientbioai.packing import alignment

SCALES = {Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1), Fraction(2), Fraction(4), Fraction(8)}


@dataclass
class OutputTensor:
    """One output of the network as probed: its shape relation to the input, per spatial axis.

    ``scale[i]`` (a fraction) and ``offset[i]`` (output pixels) give the output size ``scale·n + offset``
    for an input of size ``n``; ``spatial`` is False for outputs whose shape does not follow the input
    (vectors, scalars), whose ``shape`` (without the batch axis) is then recorded.
    """

    name: str
    channels: int
    spatial: bool = True
    scale: list[Fraction] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    shape: list[int] | None = None

    @property
    def border(self) -> list[int]:
        """Input pixels missing on each side (valid convolutions): ``-offset / 2`` at scale 1."""
        return [max(0, -o // 2) for o in self.offset]

    @property
    def factor(self) -> int:
        """Packed channels per output channel: the product of the up-scaling factors."""
        return int(np.prod([int(s) if s > 1 else 1 for s in self.scale]))

    @property
    def plain(self) -> bool:
        """Same size and grid as the input: nothing to pack."""
        return self.spatial and all(s == 1 for s in self.scale) and not any(self.offset)

    def record(self, start: int) -> dict[str, Any]:
        """The manifest's entry for this output, packed from channel ``start``."""
        return {
            "name": self.name,
            "channels": self.channels,
            "scale": [_number(s) for s in self.scale],
            "offset": list(self.offset),
            "packed_channels": [start, start + self.channels * self.factor],
        }


def _number(f: Fraction) -> float | int:
    return int(f) if f.denominator == 1 else float(f)


def flatten_outputs(out: Any) -> list[Any]:
    """The tensors of a ``forward`` result, in order: a tensor, a tuple / list, or a dict (by key order)."""
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    return [out]


def required_inputs(module) -> list[str]:
    """Names of the positional arguments ``forward`` needs (no default): one for an image network."""
    import inspect

    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):  # TorchScript and C++ modules may not say
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [
        p.name for p in sig.parameters.values() if p.kind in kinds and p.default is inspect.Parameter.empty
    ]


def output_names(out: Any, count: int, given: Sequence[str] | None) -> list[str]:
    """Names of the outputs: ``model.outputs`` if given, dict keys, else ``output`` / ``output0``, …"""
    if given:
        if len(given) != count:
            raise ModelLoadError(
                f"model.outputs names {len(given)} output(s) ({', '.join(given)}) but the network returns {count}",
                f"give {count} names, in the order forward() returns them",
            )
        return list(given)
    if isinstance(out, dict) and len(out) == count:
        return [str(k) for k in out]
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def _probe_sizes(step: int, tile_min: int) -> list[int]:
    """Three valid sizes ``tile_min + n·step`` from about 32 up; an odd multiple of the step first, so
    that a size is divisible by the step but not by twice the step."""
    n = max(0, -(-(32 - tile_min) // step))
    first = tile_min + n * step
    if tile_min == step and (first // step) % 2 == 0:
        first += step
    return [first, first + 2 * step, first + 4 * step]


def _relation(sizes: Sequence[int], outs: Sequence[int]) -> tuple[Fraction, int] | None:
    """(scale, offset) with ``out = scale·n + offset`` exactly for every probe size, or None."""
    scale = Fraction(outs[1] - outs[0], sizes[1] - sizes[0])
    if scale not in SCALES:
        return None
    offset = outs[0] - scale * sizes[0]
    if offset.denominator != 1 or any(o != scale * n + offset for n, o in zip(sizes, outs, strict=True)):
        return None
    return scale, int(offset)


def _placeable(rel: tuple[Fraction, int] | None) -> bool:
    """Whether an output with this relation can be put on the input's grid (see the module docstring)."""
    if rel is None:
        return False
    scale, offset = rel
    return offset == 0 or (scale == 1 and offset < 0 and offset % 2 == 0)


def probe_outputs(
    run: Callable[[np.ndarray], list[np.ndarray]],
    ndim: int,
    in_channels: int,
    step: Sequence[int] | None = None,
    tile_min: Sequence[int] | None = None,
) -> tuple[list[int], list[list[int]], list[list[list[int]]]]:
    """The tile step (the smallest power of two the network accepts, or ``step`` if given), the probe
    sizes per axis, and the output shapes (without batch) at those sizes: ``[[shape per probe] per output]``.

    A probed step is accepted when the network runs at three sizes and every output either follows the
    input size at one of ``SCALES`` in a way that fits the input's grid, or does not follow it at all (not
    spatial). With ``step`` given, its shapes are returned whatever they are (:func:`check_packable` says
    what does not fit).
    """
    tried = []
    candidates = [list(step)] if step else [[s] * ndim for s in (1, 2, 4, 8, 16, 32, 64)]
    for st in candidates:
        mins = list(tile_min) if step and tile_min else st
        sizes = [_probe_sizes(s, m) for s, m in zip(st, mins, strict=True)]
        try:
            shapes = [
                [
                    list(o.shape[1:])
                    for o in run(np.zeros((1, in_channels, *[sz[j] for sz in sizes]), np.float32))
                ]
                for j in range(3)
            ]
        except Exception as exc:
            tried.append(f"{st[0]} ({type(exc).__name__}: {str(exc).strip()[:80]})")
            continue
        per_output = [list(x) for x in zip(*shapes, strict=True)]
        if step or all(_fits(p, sizes, ndim) for p in per_output):
            return st, sizes, per_output
        tried.append(
            f"{st[0]} (outputs {[p[0] for p in per_output]} for an input of {[s[0] for s in sizes]})"
        )
    raise ModelLoadError(
        "could not find tile sizes that the network accepts and maps to outputs on the input's grid (tried "
        f"multiples of {', '.join(tried)})",
        "set model.tile_step in the config, or check that the network runs on tiles of the image's "
        "dimensionality",
    )


def _spatial(shapes: list[list[int]], ndim: int) -> bool:
    return len(shapes[0]) == ndim + 1 and shapes[0][1:] != shapes[1][1:]


def _fits(shapes: list[list[int]], sizes: list[list[int]], ndim: int) -> bool:
    if not _spatial(shapes, ndim):
        return shapes[0] == shapes[1] == shapes[2]  # not spatial: the same shape whatever the input
    return len({sh[0] for sh in shapes}) == 1 and all(
        _placeable(_relation(sizes[i], [sh[1 + i] for sh in shapes])) for i in range(ndim)
    )


def describe_outputs(
    shapes: list[list[list[int]]], sizes: list[list[int]], names: Sequence[str], ndim: int
) -> list[OutputTensor]:
    """:class:`OutputTensor` per output from the probed shapes (see :func:`probe_outputs`)."""
    out = []
    for name, sh in zip(names, shapes, strict=True):
        rel = [_relation(sizes[i], [s[1 + i] for s in sh]) for i in range(ndim)] if _spatial(sh, ndim) else []
        if not rel or any(r is None for r in rel) or len({s[0] for s in sh}) != 1:
            out.append(OutputTensor(name, int(sh[0][0]) if sh[0] else 1, spatial=False, shape=list(sh[0])))
            continue
        out.append(OutputTensor(name, int(sh[0][0]), scale=[r[0] for r in rel], offset=[r[1] for r in rel]))
    return out


def check_packable(outputs: Sequence[OutputTensor], drop: Sequence[str]) -> list[OutputTensor]:
    """The outputs the artifact keeps (``drop`` removed), or the error that names what cannot be tiled."""
    names = [o.name for o in outputs]
    unknown = [d for d in drop if d not in names]
    if unknown:
        raise ModelLoadError(
            f"model.drop_outputs: {', '.join(unknown)} is not an output of the network",
            f"its outputs are: {', '.join(names)}",
        )
    kept = [o for o in outputs if o.name not in drop]
    if not kept:
        raise ModelLoadError("model.drop_outputs drops every output", "keep at least one spatial output")
    for o in kept:
        if not o.spatial:
            raise ModelLoadError(
                f"output '{o.name}' (shape {o.shape} per image) is not spatial: its shape does not follow the "
                "input's, so it cannot be computed tile by tile and stitched",
                f"add model.drop_outputs: [{o.name}] to compress the network without it (the spatial outputs "
                f"{', '.join(p.name for p in kept if p.spatial) or '-'} are kept)",
            )
        for i, (s, off) in enumerate(zip(o.scale, o.offset, strict=True)):
            if off and (s != 1 or off > 0 or off % 2):
                raise ModelLoadError(
                    f"output '{o.name}': size {s}·n{off:+d} along spatial axis {i}: only outputs that are "
                    "smaller by the same border on both sides, at the input's scale, can be placed on the "
                    "input's grid",
                    "make the network pad its output back to the input's size (or crop it to scale·n)",
                )
    return kept


def halo_for(outputs: Sequence[OutputTensor], halo: Sequence[int], ndim: int) -> list[int]:
    """The halo the packed network needs: at least each output's missing border."""
    need = list(halo) if halo else [0] * ndim
    for o in outputs:
        need = [max(h, b) for h, b in zip(need, o.border, strict=True)]
    align = alignment(outputs, ndim)
    return [-(-h // a) * a for h, a in zip(need, align, strict=True)]


def step_for(outputs: Sequence[OutputTensor], step: Sequence[int]) -> list[int]:
    """The tile step with every down-scaled output an integer number of pixels."""
    out = list(step)
    for o in outputs:
        for i, s in enumerate(o.scale):
            if s < 1:
                k = s.denominator
                out[i] = int(out[i] * k // np.gcd(out[i], k))
    return out


def records(outputs: Sequence[OutputTensor]) -> list[dict[str, Any]]:
    """The manifest's ``outputs``: each output and the packed channels it occupies."""
    out, start = [], 0
    for o in outputs:
        out.append(o.record(start))
        start += o.channels * o.factor
    return out


def pack_module(module, outputs: Sequence[OutputTensor], kept: Sequence[int], ndim: int):
    """``module`` wrapped so that ``forward`` returns the packed tensor (see the module docstring)."""
    import torch

    class PackedOutputs(torch.nn.Module):
        """The network's outputs on the input's grid, concatenated along channels."""

        def __init__(self):
            super().__init__()
            self.network = module

        def forward(self, x):
            parts = flatten_outputs(self.network(x))
            return torch.cat([_pack_torch(parts[i], outputs[j], ndim) for j, i in enumerate(kept)], 1)

    return PackedOutputs().eval()


def _pack_torch(t, o: OutputTensor, ndim: int):
    import torch.nn.functional as F

    if any(o.border):
        pad = []
        for b in reversed(o.border):  # F.pad takes the last axis first
            pad += [b, b]
        t = F.pad(t, pad)
    down = [s.denominator if s < 1 else 1 for s in o.scale]
    if any(k > 1 for k in down):
        t = F.interpolate(t, scale_factor=tuple(float(k) for k in down), mode="nearest")
    up = [int(s) if s > 1 else 1 for s in o.scale]
    if any(k > 1 for k in up):  # space-to-depth: (B, C, n0·k0, …) → (B, C·k0·…, n0, …)
        b, c = t.shape[0], t.shape[1]
        sizes = [t.shape[2 + i] // k for i, k in enumerate(up)]
        split = [b, c]
        for n, k in zip(sizes, up, strict=True):
            split += [n, k]
        t = t.reshape(split)
        perm = [0, 1] + [3 + 2 * i for i in range(ndim)] + [2 + 2 * i for i in range(ndim)]
        t = t.permute(perm).reshape([b, c * o.factor, *sizes])
    return t
