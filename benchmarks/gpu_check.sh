#!/usr/bin/env bash
# The GPU checks in one go: the GPU tests, then benchmarks/gpu.py, within about 8 minutes.
#
#   bash benchmarks/gpu_check.sh prepare   # on a machine with PyPI access, in the repository root:
#                                          # downloads the wheels the GPU machine lacks into .whl/
#   bash benchmarks/gpu_check.sh run       # on the GPU machine (no network needed), repository root
#   bash benchmarks/gpu_check.sh           # both (a GPU machine that reaches PyPI)
#
# `run` makes a virtual environment that sees the machine's own PyTorch CUDA build
# (--system-site-packages: never let pip resolve torch, it would fetch GBs of CUDA wheels), installs
# efficientbioai and the wheels in .whl/ (or, when an index is reachable, the [gpu] extra: tensorrt-cu12,
# onnxruntime-gpu, nvidia-ml-py), and runs:
#   1. pytest tests/test_gpu.py (the GPU tests run; the others run too) — 3 minutes at most;
#   2. benchmarks/gpu.py — 5 minutes at most — writing gpu_results.json (to $OUT when set).
# TensorRT's libraries (tensorrt-cu12-libs) are downloaded by that package from NVIDIA's own index, not
# from PyPI: where neither machine reaches it, the TensorRT tests and rows are skipped with that reason
# and the torch-cuda rows, NVML energy and the GPU tests of the other engines still run.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"
WHL=.whl
OUT_DIR="${OUT:-.}"
PY=python3

# Packages efficientbioai needs that a plain CUDA + PyTorch image usually lacks (versions as tested on CPU).
MISSING=(
    "pydantic==2.12.5" "pydantic-core==2.41.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
    "nncf==3.4.0" "openvino-telemetry==2025.2.0" "pydot==4.0.1"
    "monai==1.6.1" "onnxslim==0.1.98" "torch-pruning==1.6.1"
    "zarr==3.1.6" "numcodecs==0.16.6" "donfig==0.8.1.post1" "google-crc32c==1.9.0"
)
GPU_EXTRA=("tensorrt-cu12" "onnxruntime-gpu" "nvidia-ml-py")

prepare() {
    mkdir -p "$WHL"
    exclude="$(git rev-parse --git-path info/exclude 2>/dev/null || echo .git/info/exclude)"
    grep -qx "/$WHL/" "$exclude" 2>/dev/null || echo "/$WHL/" >>"$exclude"
    for pkg in "${MISSING[@]}"; do
        $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHL" "$pkg" || echo "prepare: could not download $pkg" >&2
    done
    # tensorrt-cu12's Python bindings are a real wheel; its libraries are fetched from NVIDIA's index at
    # install time, and onnxruntime-gpu is far larger than what a device call carries: not downloaded here.
    du -sh "$WHL"
}

run() {
    if ! command -v nvidia-smi >/dev/null; then
        echo "gpu_check: no nvidia-smi here: run this on the GPU machine" >&2
    else
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
    $PY -m venv --system-site-packages /tmp/ebai-gpu-venv && . /tmp/ebai-gpu-venv/bin/activate
    if [ -d "$WHL" ] && ls "$WHL"/*.whl >/dev/null 2>&1; then
        python -m pip install --quiet --no-index --no-deps --no-compile "$WHL"/*.whl
    fi
    python -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
        || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # the [gpu] extra, where an index is reachable (a user's workstation); never torch
    timeout 240 python -m pip install --quiet "${GPU_EXTRA[@]}" 2>/dev/null \
        || echo "gpu_check: the [gpu] extra could not be installed here (no package index reachable?)"
    python - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available() and torch.cuda.get_device_name(0)}")
for mod in ("tensorrt", "onnxruntime", "pynvml"):
    try:
        m = __import__(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod}: not available ({type(exc).__name__}: {exc})")
EOF
    export PYTHONUNBUFFERED=1
    timeout 180 python -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
    timeout 300 python benchmarks/gpu.py --repeats 3 --batch 4 --opt-level 2 \
        --json "$OUT_DIR/gpu_results.json" 2>&1 | tee "$OUT_DIR/gpu_benchmark.log"
}

case "$mode" in
    prepare) prepare ;;
    run) run ;;
    all) prepare && run ;;
    *) echo "usage: $0 [prepare|run]" >&2; exit 2 ;;
esac
