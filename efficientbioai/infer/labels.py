"""Instance labels of a prediction too large for one piece of memory, block by block, consistent at edges.

As Cellpose's distributed mode does: (1) each block is labelled on its own
(:func:`~efficientbioai.metrics.instances_from_probability`) and written with its local labels 1..n;
(2) each block's labels get a unique offset, and labels that touch across a face between two blocks
(with full connectivity, diagonal neighbours included) are joined with a union-find; objects smaller
than ``min_size`` voxels (counted over all their blocks) are dropped; (3) a relabel pass writes the final
labels 1..N block by block. With ``method: components`` the objects are exactly those of labelling the
whole image at once (numbered in another order); with ``watershed`` objects split inside a block stay
split, and pieces of one object cut by a block edge are joined again.

Steps (1) and (3) are independent per block: pass a ``dask.distributed`` client to run them as tasks
(the blocks are read and written by the workers; only label counts and the label mapping travel).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from efficientbioai.config import InstanceConfig
from efficientbioai.errors import ConfigError


def _open(store: str | Path, path: str = "0"):
    import zarr

    return zarr.open_array(store=str(store), path=path, mode="r+")


def _label_block(prob_store, prob_index, labels_store, region, threshold, method) -> np.ndarray:
    """Step 1 for one block: local labels written; returns the voxel count of each label (index 0 unused)."""
    from efficientbioai.metrics import instances_from_probability

    prob = np.asarray(_open(prob_store)[(*prob_index, *region)], np.float32)
    local = instances_from_probability(prob, threshold=threshold, method=method, min_size=0).astype(np.int32)
    _open(labels_store)[region] = local
    return np.bincount(local.ravel())


def _relabel_block(labels_store, region, offset, mapping) -> None:
    """Step 3 for one block: local label l becomes mapping[l + offset] (0 stays 0)."""
    arr = _open(labels_store)
    local = np.asarray(arr[region]).astype(np.int64)
    arr[region] = np.where(local > 0, mapping[np.where(local > 0, local + offset, 0)], 0).astype(np.int32)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _touching_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(k, 2) pairs of labels facing each other across a face, with full connectivity: ``left`` and
    ``right`` are the two planes on either side of the face (global labels, 0 = background)."""
    pairs = []
    nd = left.ndim
    for shift in itertools.product((-1, 0, 1), repeat=nd):
        a_sl, b_sl = [], []
        for s, n in zip(shift, left.shape, strict=True):
            a_sl.append(slice(max(0, -s), n - max(0, s)))
            b_sl.append(slice(max(0, s), n - max(0, -s)))
        a, b = left[tuple(a_sl)], right[tuple(b_sl)]
        both = (a > 0) & (b > 0)
        if both.any():
            pairs.append(np.stack([a[both], b[both]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(pairs).astype(np.int64), axis=0)


def label_blocks(
    prob_store: str | Path,
    labels_store: str | Path,
    regions: Sequence[tuple[slice, ...]],
    *,
    prob_index: tuple = (),
    threshold: float = 0.5,
    method: str = "components",
    min_size: int = 0,
    client: Any = None,
) -> int:
    """Label the foreground (``prob > threshold``) of the zarr array ``"0"`` in ``prob_store`` into the
    int32 zarr array ``"0"`` of ``labels_store`` (same spatial shape, chunks that tile ``regions``), block
    by block. ``prob_index`` selects the spatial array inside the probability array (e.g. ``(0,)`` for a
    channel). Returns the number of objects. See the module docstring.
    """
    shape = tuple(_open(labels_store).shape)
    regions = [tuple(slice(int(r.start), int(r.stop)) for r in reg) for reg in regions]

    def run(fn, args_list):
        if client is None:
            return [fn(*args) for args in args_list]
        futures = [client.submit(fn, *args, pure=False) for args in args_list]
        return client.gather(futures)

    counts = run(
        _label_block,
        [(str(prob_store), prob_index, str(labels_store), r, threshold, method) for r in regions],
    )
    n_local = [len(c) - 1 if len(c) else 0 for c in counts]
    offsets = np.concatenate([[0], np.cumsum(n_local)]).astype(np.int64)
    total = int(offsets[-1])
    sizes = np.zeros(total + 1, np.int64)
    for c, off in zip(counts, offsets[:-1], strict=True):
        sizes[off + 1 : off + len(c)] = c[1:]

    # faces: for each axis, each inner block edge; planes are read whole along that edge (small)
    block_of = {}  # region start → offset, to make global labels of a plane
    for r, off in zip(regions, offsets[:-1], strict=True):
        block_of[tuple(s.start for s in r)] = (r, int(off))
    labels = _open(labels_store)
    uf = _UnionFind(total + 1)
    edges = [sorted({r[d].start for r in regions} - {0}) for d in range(len(shape))]

    def global_plane(d: int, pos: int) -> np.ndarray:
        """Labels of the plane at ``pos`` along axis ``d`` with block offsets added."""
        key = tuple(slice(pos, pos + 1) if a == d else slice(None) for a in range(len(shape)))
        plane = np.asarray(labels[key]).astype(np.int64)
        for r, off in block_of.values():
            if not r[d].start <= pos < r[d].stop:
                continue
            sub = tuple(slice(0, 1) if a == d else r[a] for a in range(len(shape)))
            part = plane[sub]
            part[part > 0] += off
        return np.take(plane, 0, axis=d)

    for d, positions in enumerate(edges):
        for pos in positions:
            for a, b in _touching_pairs(global_plane(d, pos - 1), global_plane(d, pos)):
                uf.union(int(a), int(b))

    roots = np.array([uf.find(i) for i in range(total + 1)], np.int64)
    merged_sizes = np.bincount(roots, weights=sizes, minlength=total + 1)
    keep = (merged_sizes >= max(min_size, 1)) & (np.arange(total + 1) > 0)
    new_id = np.zeros(total + 1, np.int64)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1)
    mapping = new_id[roots].astype(np.int32)
    if client is not None:
        [mapping_ref] = client.scatter([mapping], broadcast=True)
        run(
            _relabel_block,
            [
                (str(labels_store), r, int(off), mapping_ref)
                for r, off in zip(regions, offsets[:-1], strict=True)
            ],
        )
    else:
        run(
            _relabel_block,
            [(str(labels_store), r, int(off), mapping) for r, off in zip(regions, offsets[:-1], strict=True)],
        )
    return int(keep.sum())


def wants_labels(instance: InstanceConfig, task: str | None, several: bool = False) -> bool:
    """Whether to write labels (``instance.write_labels`` with task instance); ``several``: the prediction
    has channel or sample axes, which is an error then."""
    if not (instance.write_labels and task == "instance"):
        return False
    if several:
        raise ConfigError(
            "instance.write_labels: labels are made from one foreground channel of one image, but this "
            "prediction has several channels or samples",
            "set instance.write_labels: false, or give single-channel, single-sample images",
        )
    return True


def labels_provenance(record: dict | None, instance: InstanceConfig, threshold: float) -> dict | None:
    """The provenance of a label image: its prediction's, plus how the labels were made."""
    if record is None:
        return None
    labels = {"threshold": threshold, "method": instance.method, "min_size": instance.min_size}
    return {**record, "labels": labels}


def write_labels_blockwise(
    instance: InstanceConfig, threshold: float, out, layout, regions, client=None
) -> None:
    """Label the prediction in ``out``'s store block by block into ``labels_path(out.path)``."""
    from efficientbioai.infer.images import labels_path
    from efficientbioai.io import ChunkedOutput

    spatial = layout.shape
    labels = ChunkedOutput(
        labels_path(out.path),
        spatial,
        np.int32,
        axes=layout.axes,
        chunks=layout.chunks,
        fingerprint=out.fingerprint + "-labels",
        pixel_size=out.metadata.get("pixel_size"),
        provenance=labels_provenance(out.metadata.get("provenance"), instance, threshold),
    )
    labels.create()  # the blocks' tasks open it by path
    label_blocks(
        out.store,
        labels.store,
        regions,
        threshold=threshold,
        method=instance.method,
        min_size=instance.min_size,
        client=client,
    )
    labels.commit()
