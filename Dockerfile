# syntax=docker/dockerfile:1
# ddpm-worker: the binary, libtorch 2.13.0 and the CUDA libraries of the torch wheel, on Debian slim.
# The same image runs on CUDA nodes (GPUs found through the NVIDIA container runtime's driver mount)
# and on CPU-only nodes.
#
#   podman build -t ddpm-worker:0.1.0 .      (or docker build; `make image` does this here)
#
# Layout: /usr/local/bin/ddpm-worker, whose RUNPATH is $ORIGIN/../lib/ddpm-worker/torch/lib; beside it
# /usr/local/lib/ddpm-worker/{torch/lib,nvidia/*/lib} keep the wheel's relative layout, so libtorch's
# own RPATH ($ORIGIN/../../nvidia/*/lib) finds the CUDA libraries unchanged.

ARG DEBIAN_SUITE=bookworm
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# libtorch as tch builds against it: the pinned torch wheel (with its nvidia-* CUDA wheels), the CUDA
# headers that the CUDA graph shim (src/cuda/shim.cpp) needs beside it, and nvcc for the fused
# group-norm kernels (src/cuda/group_norm.cu). In the same layer, /stage/lib/ddpm-worker: the shared
# libraries the image ships, libtorch (less its Python bindings) and the CUDA libraries, without headers,
# static archives or Python files. They are hard links to the venv's files, so the layer holds their
# ~4 GB once (a copy in a layer of its own doubled it), and pip keeps no cache of the ~3 GB of wheels:
# a cold build needs that much less disk (scripts/image/space.sh).
COPY scripts/requirements.txt /tmp/requirements.txt
RUN set -eu; \
    python3 -m venv /opt/torch; \
    /opt/torch/bin/pip install --quiet --no-cache-dir \
        $(grep -E '^(torch|nvidia-cuda-crt|nvidia-cuda-nvcc|nvidia-nvvm|nvidia-cuda-cccl)==' /tmp/requirements.txt); \
    site=$(/opt/torch/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    dest=/stage/lib/ddpm-worker; \
    mkdir -p "$dest/torch" "$dest/nvidia"; \
    cp -al "$site/torch/lib" "$dest/torch/lib"; \
    rm -f "$dest/torch/lib/libtorch_python.so" "$dest/torch/lib/libshm.so"; \
    rm -rf "$dest/torch/lib/libshm" "$dest/torch/lib/libshm_windows"; \
    for pkg in "$site"/nvidia/*/; do \
        [ -d "$pkg/lib" ] || continue; \
        name=$(basename "$pkg"); mkdir -p "$dest/nvidia/$name"; cp -al "$pkg/lib" "$dest/nvidia/$name/lib"; \
    done; \
    find "$dest" \( -name '*.a' -o -name '*.bc' -o -name '*.py' -o -name '__pycache__' -o -name '*.h' \) -prune -exec rm -rf {} +; \
    # Not loaded by libtorch: nvcc's NVVM, multi-GPU cuSOLVER, the BLAS/FFTW shims, nvrtc's alternative build, and the
    # GPUDirect-RDMA and multi-node NVSHMEM plugins (they need MPI, PMIx, UCX, libfabric or Mellanox
    # libraries, which a single-pod worker does not have).
    cd "$dest/nvidia"; \
    rm -f cu13/lib/libnvvm.so* cu13/lib/libcusolverMg.so.* cu13/lib/libcufftw.so.* cu13/lib/libnvblas.so.* cu13/lib/libcufile_rdma.so.* \
        cu13/lib/*.alt.so* nvshmem/lib/nvshmem_bootstrap_mpi.so.* nvshmem/lib/nvshmem_bootstrap_pmix.so.* \
        nvshmem/lib/nvshmem_bootstrap_shmem.so.* nvshmem/lib/nvshmem_transport_ucx.so.* \
        nvshmem/lib/nvshmem_transport_libfabric.so.* nvshmem/lib/nvshmem_transport_ibgda.so.* \
        nvshmem/lib/nvshmem_transport_ibdevx.so.*

WORKDIR /build
COPY . .
# The registry and target dir are cache mounts: a rebuild after a source change compiles only the crate.
# Cargo tells changed sources by mtime, and COPY keeps the context's: a file edited before the cached
# build would look unchanged, so the crate's own sources are touched first (this step runs only when
# they changed anyway).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    find build.rs src proto -type f -exec touch {} + \
    && PATH=/opt/torch/bin:$PATH LIBTORCH_USE_PYTORCH=1 DDPM_RPATH='$ORIGIN/../lib/ddpm-worker/torch/lib' \
    cargo build --release --locked --bin ddpm-worker \
    && mkdir -p /stage/bin && cp target/release/ddpm-worker /stage/bin/

FROM ${RUNTIME_IMAGE}
# CA roots for S3 and the Hugging Face hub over TLS; libstdc++ and libgcc come with the base.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 ddpm \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /var/lib/ddpm-worker --shell /usr/sbin/nologin ddpm \
    && install -d -o 65532 -g 65532 /var/lib/ddpm-worker
COPY --from=builder /stage/lib/ddpm-worker /usr/local/lib/ddpm-worker
COPY --from=builder /stage/bin/ddpm-worker /usr/local/bin/ddpm-worker
USER 65532:65532
WORKDIR /var/lib/ddpm-worker
# Relative data paths (queue, outputs, scratch, model cache) land under the working directory.
ENV HF_HOME=/var/lib/ddpm-worker/hf
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/ddpm-worker"]
# Models come from DDPM_MODELS (NAME=PATH,…) or --model; queue and outputs default to ddpm-data/.
CMD ["serve", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]
# The version and revision labels come from the build command (`make image` passes
# --label org.opencontainers.image.version=… --label org.opencontainers.image.revision=<git HEAD>): they
# are set on the final image only, so a new revision rebuilds no layer (the libraries' 4 GB layer stays
# cached), and a cached build cannot carry a stale revision (buildah's layer cache ignores ARG values).
LABEL org.opencontainers.image.title="ddpm-worker" \
      org.opencontainers.image.description="Batch image generation with diffusers DDPM models on libtorch" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ddpm-worker/ddpm-worker"
