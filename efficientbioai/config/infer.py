"""The ``infer`` config: the artifact, the images, tiling, out-of-core and Dask, GPU, instances, Cellpose.

Relative paths in a config are read from the current working directory, as on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from efficientbioai.config.base import StrictConfig


class BackgroundConfig(StrictConfig):
    """Skipping tiles of flat background (off by default)."""

    skip: bool = Field(
        False, description="send flat-background tiles to no engine; they get a constant output"
    )
    threshold: float | None = Field(
        None,
        ge=0,
        description="a tile is background when the standard deviation of its raw input is below this "
        "(default: estimated per image as 2 × the 10th percentile over its tiles)",
    )


class LocalizeConfig(StrictConfig):
    """Sample localisation for sparse volumes (CT, cleared tissue; off by default).

    A first pass on a block-averaged, downsampled copy of each image finds the sample (gaussian smoothing,
    Otsu threshold, small components dropped, holes filled, grown by `margin`); only the tiles that touch
    it run. Every tile that blends into a sample voxel runs, so the output inside the sample is the output
    without localisation; the voxels no run tile covers get the background value (their fraction is
    reported). Where Otsu finds no foreground the whole image runs.
    """

    enabled: bool = Field(False, description="find the sample first and run only the tiles that touch it")
    downsample: Literal["auto"] | int | list[int] = Field(
        "auto",
        description="block-averaging factor of the low-resolution copy, one number or one per spatial axis "
        "(auto: the smallest factor that keeps the copy under about 2 million voxels)",
    )
    sigma: float = Field(
        1.0, ge=0, description="gaussian smoothing of the low-resolution copy, in low-resolution voxels"
    )
    min_size: int = Field(
        0,
        ge=0,
        description="foreground components smaller than this many (full-resolution) voxels are dropped",
    )
    margin: Literal["auto"] | int | list[int] = Field(
        "auto",
        description="voxels by which the sample is grown before tiles are chosen, one number or one per "
        "spatial axis (auto: the model's halo plus one low-resolution voxel)",
    )
    region: Literal["mask", "box"] = Field(
        "mask",
        description="run the tiles that touch the sample itself (mask) or the bounding box of each of its "
        "connected parts (box: fewer holes, more tiles)",
    )
    invert: bool = Field(False, description="the sample is darker than the background (e.g. bright-field)")
    value: float | None = Field(
        None,
        description="output of the skipped voxels (default: the engine's mean output, per channel, on the "
        "flattest tile outside the sample); when set, it also applies to tiles skipped as flat background",
    )

    @field_validator("downsample", "margin")
    @classmethod
    def _per_axis(cls, v: Any, info) -> Any:
        low = 1 if info.field_name == "downsample" else 0
        values = v if isinstance(v, list) else [v] if isinstance(v, int) else []
        if isinstance(v, list) and not 2 <= len(v) <= 3:
            raise ValueError(f"give one number or one per spatial axis (2 or 3 values), got {len(v)}")
        if any(x < low for x in values):
            raise ValueError(f"values must be at least {low}, got {v}")
        return v


class TilingConfig(StrictConfig):
    """Sliding-window inference over whole images."""

    tile_shape: list[int] | None = Field(
        None, description="spatial tile shape, e.g. [256, 256] or [32, 128, 128] (default: the compress tile)"
    )
    overlap: float = Field(0.25, ge=0, lt=1, description="fraction of a tile shared with its neighbour")
    blend: Literal["gaussian", "constant"] = Field(
        "gaussian",
        description="how overlapping tiles are weighted: gaussian (centre counts most) or constant",
    )
    batch_size: int = Field(1, ge=1, description="tiles per engine call")
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    localize: LocalizeConfig = Field(default_factory=LocalizeConfig)
    out_of_core: Literal["auto", "true", "false"] = Field(
        "auto",
        description="blend into a bounded band of output and write finished chunks to disk as they complete "
        "(memory independent of the image size; a rerun resumes after an interruption). auto: for zarr "
        "outputs and for images whose float32 output would exceed 4 × band_memory_mb, unless "
        "compare_with_original or whole-image post-processing need whole outputs; false: the whole output "
        "in memory",
    )
    band_memory_mb: float = Field(
        512,
        gt=0,
        description="out of core: memory for the band of output held while blending; sets how many planes "
        "(along the slowest axis) a written chunk holds",
    )
    read_cache_mb: float = Field(
        256,
        ge=0,
        description="zarr / OME-Zarr inputs: memory for decoded input chunks kept for the next tiles "
        "(overlapping tiles share chunks; without it each tile decodes every chunk it touches again); grown "
        "to twice the chunks under one tile when the input's chunks are larger (a note says so); 0: off",
    )

    @field_validator("out_of_core", mode="before")
    @classmethod
    def _out_of_core(cls, v: Any) -> Any:
        return {True: "true", False: "false"}.get(v, v) if isinstance(v, bool) else v


JOBQUEUE_CLUSTERS = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "sge": "SGECluster",
    "htcondor": "HTCondorCluster",
    "moab": "MoabCluster",
    "oar": "OARCluster",
}


class DistributedConfig(StrictConfig):
    """Run `infer` on a Dask cluster: blocks of the output are independent tasks (zarr and TIFF outputs)."""

    scheduler: str = Field(
        "local",
        description="local (a dask.distributed LocalCluster on this machine), the address of a running "
        "scheduler (tcp://host:8786), or a batch system through dask-jobqueue: "
        + " | ".join(JOBQUEUE_CLUSTERS),
    )
    n_workers: int = Field(2, ge=1, description="workers to start (local cluster, or jobs to scale to)")
    threads_per_worker: int = Field(1, ge=1, description="threads per worker (local cluster)")
    engine_threads: int | None = Field(
        None, ge=1, description="CPU threads of each worker's engine (default: threads_per_worker)"
    )
    processes: bool = Field(True, description="local cluster: workers in separate processes (else threads)")
    block_shape: list[int] | None = Field(
        None,
        description="spatial shape of one task's output block, a multiple of the output chunks "
        "(default: about 64 M voxels, shaped like the tile)",
    )
    cluster_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments for the dask-jobqueue cluster class (cores, memory, queue, walltime, "
        "account, job_extra_directives, ...)",
    )

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        v = v.strip()
        if v == "local" or v.lower() in JOBQUEUE_CLUSTERS or "://" in v:
            return v.lower() if "://" not in v else v
        raise ValueError(
            f"'{v}' is not a scheduler: use local, an address such as tcp://10.0.0.5:8786, or one of "
            f"{', '.join(JOBQUEUE_CLUSTERS)} (dask-jobqueue)"
        )

    @field_validator("block_shape")
    @classmethod
    def _block(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(n < 1 for n in v)):
            raise ValueError("block_shape needs one positive size per spatial axis, e.g. [64, 512, 512]")
        return v

    @model_validator(mode="after")
    def _kwargs_only_for_jobqueue(self) -> DistributedConfig:
        if self.cluster_kwargs and self.scheduler not in JOBQUEUE_CLUSTERS:
            raise ValueError(
                "cluster_kwargs are for dask-jobqueue clusters (scheduler: slurm, pbs, ...); "
                f"remove them for scheduler: {self.scheduler}"
            )
        return self


class InstanceConfig(StrictConfig):
    """task instance: how instances are made from the foreground probability."""

    method: Literal["components", "watershed"] = Field(
        "components", description="connected components, or a watershed that splits touching objects"
    )
    min_size: int = Field(0, ge=0, description="objects smaller than this many pixels are removed")
    write_labels: bool = Field(
        False,
        description="also write each prediction's label image (int32) as <name>_labels.<tif|zarr> beside it; "
        "out of core and on Dask it is labelled block by block, with objects joined across block edges",
    )


class CellposeInferConfig(StrictConfig):
    """Cellpose artifacts (model.kind cellpose): cellpose's own eval settings, as cellpose users set them.

    Cellpose tiles, rescales and reconstructs the masks itself; the `tiling`, `task`, `threshold` and
    `instance` keys do not apply to these artifacts.
    """

    channels: list[int] = Field(
        default_factory=lambda: [0, 0],
        description="[channel to segment, nucleus channel]: 0 = grayscale / none, 1 = red, 2 = green, 3 = blue",
    )
    diameter: float | None = Field(
        None,
        gt=0,
        description="objects' diameter in pixels; images are resized by diam_mean / diameter for the network "
        "(default: the model's training diameter, as CellposeModel)",
    )
    flow_threshold: float = Field(0.4, ge=0, description="maximum flow error of a kept mask")
    cellprob_threshold: float = Field(0.0, description="cell probability (logit) above which pixels count")
    min_size: int = Field(15, description="masks smaller than this many pixels are removed (-1: keep all)")
    niter: int | None = Field(None, ge=1, description="flow-dynamics iterations (default: 200 / rescale)")
    bsize: int = Field(224, ge=16, multiple_of=8, description="tile size in pixels (cellpose's default 224)")
    tile_overlap: float = Field(0.1, ge=0, lt=0.5, description="fraction of overlap between tiles")
    batch_size: int = Field(8, ge=1, description="tiles per network call")
    augment: bool = Field(False, description="cellpose's flipped-tile augmentation (4x the network work)")
    normalize: bool = Field(True, description="percentile-normalise each channel (1st → 0, 99th → 1)")
    invert: bool = Field(False, description="invert intensities (dark objects on a bright background)")


class GpuConfig(StrictConfig):
    """NVIDIA GPU engines in `infer`."""

    index: int = Field(0, ge=0, description="CUDA device index of the GPU to run on")
    torch_precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp16", description="backend torch-cuda: fp32, or fp16 / bf16 autocast"
    )
    channels_last: bool = Field(True, description="backend torch-cuda: channels-last memory format")


BACKENDS = (
    "openvino",
    "onnxruntime",
    "torch",
    "tensorrt",
    "torch-cuda",
    "onnxruntime-cuda",
    "onnxruntime-tensorrt",
)
"""The engines ``infer`` can run (``backend:``)."""


GPU_BACKENDS = ("tensorrt", "torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt")
"""The backends that run on an NVIDIA GPU."""


class InferConfig(StrictConfig):
    """`efficientbioai infer`: run a compressed engine over whole images."""

    model: Path = Field(description="an artifact directory written by `efficientbioai compress`")
    backend: Literal[BACKENDS] | None = Field(
        None,
        description="engine to run: openvino | onnxruntime | torch (the original model) on the CPU; tensorrt | "
        "torch-cuda (the original model) | onnxruntime-cuda | onnxruntime-tensorrt on an NVIDIA GPU "
        "(default: with a GPU, tensorrt when the artifact has it, else torch-cuda; without, the artifact's "
        "best CPU engine)",
    )
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    input: str = Field(description="a file, a glob, a folder, or a zarr / OME-Zarr store")
    axes: str | None = Field(
        None, description="axes of the input images, e.g. 'zyx' or 'cyx' (default: from the file or inferred)"
    )
    output: Path = Field(description="folder for the predictions (named after their inputs)")
    output_format: Literal["tiff", "zarr"] | None = Field(
        None, description="tiff or zarr (default: zarr for zarr inputs, else tiff)"
    )
    nonfinite: Literal["refuse", "fill"] = Field(
        "refuse",
        description="NaN / inf in a floating-point input: refuse the image (naming how many and where), or "
        "fill them with fill_value and mark their outputs NaN",
    )
    fill_value: float = Field(
        0.0, allow_inf_nan=False, description="nonfinite: fill: the value NaN / inf input voxels get"
    )
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    targets: str | None = Field(
        None, description="ground truth for the images (same sorted order), enabling task metrics"
    )
    task: Literal["restoration", "semantic", "instance"] | None = Field(
        None,
        description="metrics against targets: restoration (Pearson, PSNR, SSIM), semantic (Dice, IoU), "
        "instance (AP@0.5, F1) (default: the compress fidelity task, else restoration)",
    )
    threshold: float = Field(0.5, description="semantic / instance: outputs above this are foreground")
    instance: InstanceConfig = Field(default_factory=InstanceConfig)
    cellpose: CellposeInferConfig = Field(default_factory=CellposeInferConfig)
    distributed: DistributedConfig | None = Field(
        None, description="run on a Dask cluster (see DistributedConfig); absent: this process only"
    )
    compare_with_original: bool = Field(
        False, description="also run the original PyTorch (or ONNX) model and report both side by side"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for the engines (default: all cores)")
    energy: bool = Field(True, description="measure energy with CodeCarbon's offline tracker")
    overwrite: bool = Field(False, description="recompute outputs that already exist")

    @field_validator("model")
    @classmethod
    def _artifact(cls, v: Path) -> Path:
        v = v.expanduser()
        if not (v / "manifest.yaml").is_file():
            raise ValueError(
                f"'{v}' is not an artifact directory (no manifest.yaml); run `efficientbioai compress` "
                f"first (relative paths are read from {Path.cwd()})"
            )
        return v

    @field_validator("axes")
    @classmethod
    def _image_axes(cls, v: str | None) -> str | None:
        if v is not None and (set(v.lower()) - set("bczyx") or len(set(v.lower())) != len(v)):
            raise ValueError(f"'{v}' is not an axes string: use the letters b, c, z, y, x once each")
        return v.lower() if v else v
