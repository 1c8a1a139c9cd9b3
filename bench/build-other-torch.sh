#!/usr/bin/env bash
# Builds ddpm-worker against another PyTorch than the pinned 2.13.0, for benchmarking on a machine that has
# only its own torch (a lent GPU machine with torch 2.11 and no compiler or network, say):
#
#     bench/build-other-torch.sh VENV OUT_BINARY [OUT_LIB_TESTS]    (ddpm-bench goes beside OUT_BINARY)
#
# VENV is a virtual environment holding that torch (and, for CUDA graphs, the wheel's CUDA headers:
# nvidia-cuda-crt). The C++ side of torch-sys 0.26 is generated for 2.13; the few operators that an older
# libtorch lacks (none of which ddpm-worker calls) are compiled to throw instead, in a patched copy of
# torch-sys outside the clone. The binary finds libtorch through LD_LIBRARY_PATH on the target machine
# (its runpath names VENV's torch/lib). Nothing in the clone changes: the build runs in a copy.
# With OUT_LIB_TESTS, the library's unit tests are built too (for the tests that need a GPU, run there
# with `OUT_LIB_TESTS --ignored`).
set -euo pipefail
venv=$(realpath "$1")
out=$(realpath -m "$2")
tests_out=${3:+$(realpath -m "$3")}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${DDPM_OTHER_TORCH_WORK:-$HOME/.cache/ddpm-worker/other-torch}
version=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
mkdir -p "$work"

registry=$(cargo metadata --manifest-path "$repo/Cargo.toml" --format-version 1 --locked |
    "$venv/bin/python" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "torch-sys"))')
sys_src=$(dirname "$registry")
patched=$work/torch-sys-$version
if [ ! -f "$patched/.patched" ]; then
    rm -rf "$patched" && cp -r "$sys_src" "$patched"
    torch=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
    generated=$patched/libtch/torch_api_generated.cpp
    # Lines that do not compile against this libtorch: each is an operator call inside PROTECT( … ).
    errors=$({ g++ -std=c++17 -fsyntax-only -w -fmax-errors=0 -D_GLIBCXX_USE_CXX11_ABI=1 -I"$torch/include" \
        -I"$torch/include/torch/csrc/api/include" "$generated" 2>&1 || true; } |
        sed -n 's/^[^:]*torch_api_generated\.cpp:\([0-9]*\):[0-9]*: error: .*/\1/p' | sort -un)
    "$venv/bin/python" - "$generated" $errors <<'EOF'
import sys
path, lines = sys.argv[1], {int(n) for n in sys.argv[2:]}
src = open(path).read().split("\n")
out, skip = [], False
for number, line in enumerate(src, 1):
    if number in lines:
        out.append(f'    throw std::runtime_error("not in this libtorch");')
        skip = True
    elif skip and line.strip() == ")":
        skip = False
        out.append(line)
    elif not skip:
        out.append(line)
open(path, "w").write("\n".join(out))
print(f"torch-sys: {len(lines)} operators stubbed for this libtorch", file=sys.stderr)
EOF
    touch "$patched/.patched"
fi

# Without -t: a changed file gets a new mtime, so cargo sees it as newer than the last build.
rsync -rl --checksum --delete --exclude target --exclude .git --exclude .whl --exclude .gpu "$repo/" "$work/src/"
cd "$work/src"
PATH=$venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=$work/target \
    cargo build --release --bin ddpm-worker --bin ddpm-bench --config "patch.crates-io.torch-sys.path=\"$patched\""
mkdir -p "$(dirname "$out")"
strip -o "$out" "$work/target/release/ddpm-worker"
strip -o "$(dirname "$out")/ddpm-bench" "$work/target/release/ddpm-bench"
echo "built $out against torch $version" >&2
if [ -n "$tests_out" ]; then
    tests=$(PATH=$venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=$work/target \
        cargo test --release --lib --no-run --message-format=json \
        --config "patch.crates-io.torch-sys.path=\"$patched\"" |
        "$venv/bin/python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
    mkdir -p "$(dirname "$tests_out")"
    strip -o "$tests_out" "$tests"
    echo "built $tests_out" >&2
fi
