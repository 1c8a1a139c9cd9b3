#!/usr/bin/env bash
# Makes room for `make image` in podman's storage before CI builds it.
#
# What a cold build takes from the disk at its lowest, measured here from an empty podman store (base
# images, layers and cache mounts all made anew), with the tests running beside it:
#   2026-12-07, the libraries copied into a layer of their own, pip's cache kept: 69 -> 32 GB free (37 GB)
#   2026-12-07, the libraries hard-linked in the venv's layer, no pip cache:     67 -> 36 GB free (31 GB)
# The lowest point came as the final image was committed; 18 GB stay in podman's store afterwards. A warm build (the image exists; its libraries'
# layer is cached, since the revision label comes last in the Dockerfile) writes only the binary's
# layers. So a warm build needs WARM_GB free and a cold one COLD_GB (the 31 GB measured, and room
# to spare); where a warm build lacks room, podman's unused images are removed, and the build that
# follows is cold. CI runs on a machine shared with earlier work, where a full disk once stopped the
# image build half-way, and where 37 GB free once refused a cold build that needed 45.
#
#   scripts/image/space.sh [IMAGE]        (default ddpm-worker:<Cargo.toml's version>)
set -euo pipefail
PODMAN=${PODMAN:-podman}
WARM_GB=${WARM_GB:-10}
COLD_GB=${COLD_GB:-35}
cd "$(dirname "$0")/../.."
IMAGE=${1:-ddpm-worker:$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}
store=$($PODMAN info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)
mkdir -p "$store"
free_gb() { df --output=avail -BG "$store" | tail -1 | tr -dc 0-9; }
if $PODMAN image exists "$IMAGE"; then need=$WARM_GB; kind=warm; else need=$COLD_GB; kind=cold; fi
before=$(free_gb)
if ((before >= need)); then
  echo "image space: ${before} GB free under $store ($kind build of $IMAGE: need $need)"
  exit 0
fi
echo "image space: ${before} GB free under $store, a $kind build needs $need: removing podman's unused images"
$PODMAN image prune --all --force >/dev/null
after=$(free_gb)
echo "image space: ${after} GB free after pruning; the build is cold (need $COLD_GB)"
if ((after < COLD_GB)); then
  echo "image space: under $COLD_GB GB free; a cold image build needs that much (df -h $store):" >&2
  df -h "$store" >&2
  exit 1
fi
