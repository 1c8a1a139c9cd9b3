#!/usr/bin/env bash
# Makes room for `make image` in podman's storage before CI builds it. A cold build writes the builder's
# torch venv and pip cache (~7 GB), the staged libraries (~3.9 GB) and the runtime layer copied from them
# (~3.9 GB, plus a tar of it while committing); a warm one, after a source change, only the binary's
# layers. Where less than NEED_GB is free, podman's unused images (earlier builds' layers, old
# revisions) are removed first; the next build then reuses the cargo and pip cache mounts. CI runs on
# a machine shared with earlier work, where a full disk once stopped the image build half-way.
#
#   scripts/image/space.sh            (NEED_GB=25 by default)
set -euo pipefail
PODMAN=${PODMAN:-podman}
NEED_GB=${NEED_GB:-25}
store=$($PODMAN info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers/storage)
mkdir -p "$store"
free_gb() { df --output=avail -BG "$store" | tail -1 | tr -dc 0-9; }
before=$(free_gb)
if ((before >= NEED_GB)); then
    echo "image space: ${before} GB free under $store (need $NEED_GB)"
    exit 0
fi
echo "image space: ${before} GB free under $store, need $NEED_GB: removing podman's unused images"
$PODMAN image prune --all --force >/dev/null
after=$(free_gb)
echo "image space: ${after} GB free after pruning"
if ((after < NEED_GB)); then
    echo "image space: still under $NEED_GB GB free; the image build needs that much (df -h $store):" >&2
    df -h "$store" >&2
    exit 1
fi
