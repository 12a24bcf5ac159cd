#!/usr/bin/env bash
# Assembles, on this (CPU, networked) machine, what benches/gpu_suite.sh installs on a GPU
# machine that has no network, under $GPU_DIR (default .carry, ignored by git; the device tool
# carries it with `carry: [".carry"]`):
#   whl/        srt's dependencies the GPU image lacks, for CPython 3.12 x86-64
#   srtwhl/     srt as an abi3 wheel (maturin build --release)
#   fi.tar.xz   flashinfer-python, slimmed (no per-feature csrc/ subfolders; ~60 MiB whole is
#               too much for the 64 MiB a call carries), with data/aot/ holding the kernels
#               benches/gpu_prebuild.py compiled (FLASHINFER_AOT, default
#               /tmp/flashinfer-aot, made by `bash benches/gpu_carry.sh prebuild`).
#
#   bash benches/gpu_carry.sh prebuild   # hours on 2 cores; the modules of head dim 128
#   bash benches/gpu_carry.sh            # the wheels and the tarball, a minute
set -euo pipefail
GPU_DIR=${GPU_DIR:-.carry}
WORK=${WORK:-/tmp/srt-gpu-carry}
FLASHINFER=flashinfer-python==0.7.2.post1
TVM_FFI=apache-tvm-ffi==0.1.15.post2
FLASHINFER_AOT=${FLASHINFER_AOT:-/tmp/flashinfer-aot}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
mkdir -p "$WORK"

flashinfer_tree() {  # the wheel unpacked under $WORK/fi
    if [ ! -d "$WORK/fi/flashinfer" ]; then
        pip download -q --no-deps "$FLASHINFER" -d "$WORK/dl"
        mkdir -p "$WORK/fi" && (cd "$WORK/fi" && unzip -q "$WORK"/dl/flashinfer_python-*.whl)
    fi
}

prebuild() {
    # A CUDA 13.0 toolkit from PyPI (the GPU image's nvcc is 13.0), plus the cuBLAS and cuRAND
    # headers FlashInfer's sources include, and a libcuda stub to link against.
    local cuda=$WORK/cuda/nvidia/cu13
    if [ ! -x "$cuda/bin/nvcc" ]; then
        pip install -q --no-deps --target "$WORK/cuda" nvidia-cuda-nvcc==13.0.88 \
            nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 \
            nvidia-nvvm==13.0.88
        for w in nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35; do
            pip download -q --no-deps "$w" -d "$WORK/dl"
        done
        for w in "$WORK"/dl/nvidia_cublas-*.whl "$WORK"/dl/nvidia_curand-*.whl; do
            unzip -q -o "$w" 'nvidia/cu13/include/*' -d "$WORK/cuda" && rm "$w"
        done
        ln -sfn lib "$cuda/lib64"
        ln -sf libcudart.so.13 "$cuda/lib/libcudart.so"
        mkdir -p "$cuda/lib/stubs"
        echo 'void srt_libcuda_stub(void) {}' |
            gcc -shared -fPIC -x c - -Wl,-soname,libcuda.so.1 -o "$cuda/lib/stubs/libcuda.so"
    fi
    flashinfer_tree
    pip install -q --target "$WORK/build_site" "$TVM_FFI" ninja nvidia-ml-py einops tabulate
    CUDA_HOME=$cuda PYTHONPATH="$WORK/fi:$WORK/build_site" PATH="$WORK/build_site/bin:$PATH" \
        FLASHINFER_WORKSPACE_BASE="$WORK/ws" MAX_JOBS=${MAX_JOBS:-2} \
        python benches/gpu_prebuild.py --out "$FLASHINFER_AOT" "$@"
}

carry() {
    rm -rf "$GPU_DIR/whl" "$GPU_DIR/srtwhl"
    mkdir -p "$GPU_DIR/whl" "$GPU_DIR/srtwhl"
    # Versions as in this checkout's venv where it has them.
    # shellcheck disable=SC2086
    pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $PLATFORMS -d "$GPU_DIR/whl" fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 \
        pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.7.0 \
        typing_extensions==4.16.0 uvicorn==0.54.0 fastapi_offline==1.7.7 pyzmq==27.3.0 \
        msgspec==0.22.0 opentelemetry-api==1.45.2 "$TVM_FFI"
    maturin build --release -o "$GPU_DIR/srtwhl"
    flashinfer_tree
    rm -rf "$WORK/fi/flashinfer/data/aot"
    if [ -d "$FLASHINFER_AOT" ]; then
        cp -r "$FLASHINFER_AOT" "$WORK/fi/flashinfer/data/aot"
    fi
    # Everything but the per-feature source folders (Hopper paged attention, norm, RoPE and the
    # activations build from data/csrc/*.cu, data/include, cutlass and cccl).
    (cd "$WORK/fi" && find flashinfer -path 'flashinfer/data/csrc/*/*' -prune -o \
        \( -type f -not -name '*.pyc' -print \) | tar -cf - -T - | xz -T2 -6 >"$WORK/fi.tar.xz")
    mv "$WORK/fi.tar.xz" "$GPU_DIR/fi.tar.xz"
    du -sh "$GPU_DIR"/* "$GPU_DIR"
}

if [ "${1:-}" = prebuild ]; then
    shift
    prebuild "$@"
else
    carry
fi
