#!/usr/bin/env bash
# Makes room for `make image` in podman's storage before CI builds it.
#
# Measured (.ci/run from an empty cache, 2026-12-06): a cold build took the disk from 63 GB free to
# 24 GB free at its lowest: the builder's torch venv and pip cache (~7 GB), the cargo target cache mount,
# the staged libraries (~3.9 GB), the runtime layer copied from them (~3.9 GB, plus a tar of it while
# committing). A warm one (the image exists; its libraries' layer is cached, since the revision label
# comes last in the Dockerfile) writes only the binary's layers. So a warm build needs WARM_GB free and
# a cold one COLD_GB; where a warm build lacks room, podman's unused images are removed, and the build
# that follows is cold. CI runs on a machine shared with earlier work, where a full disk once stopped
# the image build half-way.
#
#   scripts/image/space.sh [IMAGE]        (default ddpm-worker:<Cargo.toml's version>)
set -euo pipefail
PODMAN=${PODMAN:-podman}
WARM_GB=${WARM_GB:-10}
COLD_GB=${COLD_GB:-45}
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
