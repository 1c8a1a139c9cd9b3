#!/usr/bin/env bash
# Makes the Dockerfile's base images locally when they are missing, for machines that reach Debian's
# package mirror but no image registry: the runtime base from `debootstrap --variant=minbase`, and the
# builder base from the same plus gcc and this machine's Rust toolchain (laid out as the official rust
# image lays it out). Each is tagged with the name the Dockerfile's FROM uses, so the Dockerfile stays
# the one a user builds anywhere; where the registry is reachable this script is not needed.
#
#   scripts/image/bases.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/../.."

PODMAN=${PODMAN:-podman}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${IMAGE_WORK:-${CACHE:-$HOME/.cache/ddpm-worker}/image-bases}
force=${1:-}

# The FROM names, read from the Dockerfile's ARG defaults so the two never disagree.
arg() { sed -n "s/^ARG $1=//p" Dockerfile; }
RUST_IMAGE=$(arg RUST_IMAGE)
RUNTIME_IMAGE=$(arg RUNTIME_IMAGE)
SUITE=$(arg DEBIAN_SUITE)
[[ -n $RUST_IMAGE && -n $RUNTIME_IMAGE && -n $SUITE ]] || { echo "Dockerfile lacks ARG RUST_IMAGE/RUNTIME_IMAGE/DEBIAN_SUITE" >&2; exit 1; }

have() { [[ $force != --force ]] && $PODMAN image exists "$1"; }

if have "$RUNTIME_IMAGE" && have "$RUST_IMAGE"; then
    echo "base images present: $RUNTIME_IMAGE, $RUST_IMAGE"
    exit 0
fi
for tool in debootstrap "$PODMAN"; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (Debian packages: debootstrap podman)" >&2; exit 1; }
done

mkdir -p "$WORK"
root=$WORK/rootfs
rm -rf "$root"
echo "debootstrap --variant=minbase $SUITE (from $MIRROR)"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
# As the slim images: no package lists, no docs or man pages.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
CFG
rm -rf "$root"/usr/share/{doc,man,info}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*

import() { # import ROOT TAG [--change …]
    local dir=$1 tag=$2
    shift 2
    tar --numeric-owner -C "$dir" -c . | $PODMAN import "$@" --change 'CMD ["bash"]' - "$tag" >/dev/null
    echo "made $tag ($($PODMAN image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))"
}

if ! have "$RUNTIME_IMAGE"; then
    import "$root" "$RUNTIME_IMAGE"
fi

if ! have "$RUST_IMAGE"; then
    # The tag's version must be the toolchain put in it.
    want=$(sed -n 's/.*rust:\([0-9][0-9.]*\).*/\1/p' <<<"$RUST_IMAGE")
    rustc_bin=$(rustup which rustc 2>/dev/null || command -v rustc)
    have_version=$("$rustc_bin" --version | awk '{print $2}')
    [[ $have_version == "$want" || $have_version == "$want".* ]] \
        || { echo "$RUST_IMAGE needs Rust $want; this machine has $have_version" >&2; exit 1; }
    toolchain=$(dirname "$(dirname "$rustc_bin")")

    mount -t proc proc "$root/proc"
    trap 'umount "$root/proc" 2>/dev/null || true' EXIT
    chroot "$root" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -qq --no-install-recommends \
        ca-certificates gcc libc6-dev >/dev/null
    # Certificate authorities this machine adds for its own egress (a TLS-intercepting proxy), so pip
    # and cargo in the build reach their registries as they do here.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null
    fi
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    umount "$root/proc"
    trap - EXIT

    # The official image's layout: RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo, every tool
    # a rustup proxy.
    name=$have_version-x86_64-unknown-linux-gnu
    mkdir -p "$root/usr/local/rustup/toolchains" "$root/usr/local/cargo/bin"
    cp -a --dereference "$toolchain" "$root/usr/local/rustup/toolchains/$name"
    rm -rf "$root/usr/local/rustup/toolchains/$name/share/doc"
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$name" \
        >"$root/usr/local/rustup/settings.toml"
    cp "$(command -v rustup)" "$root/usr/local/cargo/bin/rustup"
    for tool in cargo rustc rustdoc cargo-clippy clippy-driver rustfmt cargo-fmt; do
        ln -f "$root/usr/local/cargo/bin/rustup" "$root/usr/local/cargo/bin/$tool"
    done
    import "$root" "$RUST_IMAGE" \
        --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "ENV RUST_VERSION=$have_version" \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt'
fi
rm -rf "$root"
