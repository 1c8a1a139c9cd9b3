#!/usr/bin/env bash
# `make test-image`: checks a built image without a container runtime (this machine's cgroup setup
# cannot run OCI containers; podman can build and mount images):
#   1. `podman inspect`: a numeric non-root user, the entrypoint, the OCI labels (revision = HEAD).
#   2. Every shared library the binary needs resolves inside the image (`ldd` run in the image's root),
#      and so does every library shipped beside it except the NVIDIA driver's, which the container
#      runtime mounts on GPU nodes. No Python and no compiler in the image.
#   3. The image's entrypoint and default arguments, run from its root filesystem as its user (chroot
#      in new mount, PID and network namespaces, on a throwaway overlay), serve a tiny model; a job
#      submitted with the image's own client succeeds, every manifest sha256 is true, and the samples
#      are byte-identical to the host build's `generate` for the same request.
#
#   scripts/image/test.sh IMAGE HOST_BIN PYTHON   (PYTHON: the project venv's, for the dataset check)
set -euo pipefail
IMAGE=$1 HOST_BIN=$2 PYTHON=$3
cd "$(dirname "$0")/../.."
PODMAN=${PODMAN:-podman}
fail() { echo "test-image: FAIL: $*" >&2; exit 1; }
ok() { echo "test-image: ok: $*"; }
[[ $(id -u) == 0 ]] || fail "needs root (podman image mount, chroot, unshare)"

# 1. Configuration.
inspect() { $PODMAN image inspect --format "$1" "$IMAGE"; }
user=$(inspect '{{.Config.User}}')
[[ $user =~ ^[0-9]+(:[0-9]+)?$ && ${user%%:*} != 0 ]] || fail "user is '$user', not a numeric non-root uid"
entrypoint=$(inspect '{{json .Config.Entrypoint}}')
[[ $entrypoint == '["/usr/local/bin/ddpm-worker"]' ]] || fail "entrypoint is $entrypoint"
for label in version revision source; do
    value=$(inspect "{{index .Config.Labels \"org.opencontainers.image.$label\"}}")
    [[ -n $value && $value != "<no value>" ]] || fail "label org.opencontainers.image.$label missing"
done
revision=$(inspect '{{index .Config.Labels "org.opencontainers.image.revision"}}')
head=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[[ $revision == "$head" || $revision == "$head-dirty" ]] || fail "revision label $revision is not HEAD ($head)"
workdir=$(inspect '{{.Config.WorkingDir}}')
mapfile -t entry < <(inspect '{{range .Config.Entrypoint}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t cmd < <(inspect '{{range .Config.Cmd}}{{println .}}{{end}}' | sed '/^$/d')
mapfile -t env < <(inspect '{{range .Config.Env}}{{println .}}{{end}}' | sed '/^$/d')
ok "user $user, entrypoint $entrypoint, cmd ${cmd[*]}, workdir $workdir, labels (revision $revision)"
echo "test-image: size $($PODMAN image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec)"

root=$($PODMAN image mount "$IMAGE")
work=$(mktemp -d /tmp/ddpm-test-image.XXXXXX)
cleanup() { $PODMAN image unmount "$IMAGE" >/dev/null 2>&1 || true; [[ -n ${KEEP:-} ]] || rm -rf "$work"; }
trap cleanup EXIT

# 2. Libraries. The binary's closure is resolved through its own runpath and libtorch's rpath, as at
# run time; each shipped library must also resolve alone, except for the NVIDIA driver's libraries.
missing=$(chroot "$root" /usr/bin/ldd /usr/local/bin/ddpm-worker | grep 'not found' || true)
[[ -z $missing ]] || fail "the binary's libraries missing in the image:"$'\n'"$missing"
libs=$(cd "$root" && find usr/local/lib/ddpm-worker -name '*.so*' -type f | wc -l)
bad=$(cd "$root" && find usr/local/lib/ddpm-worker -name '*.so*' -type f -print0 \
    | xargs -0 -n 50 chroot "$root" /usr/bin/ldd 2>/dev/null | grep 'not found' \
    | grep -vE '^\s*lib(cuda|nvidia-ml)\.so\.1 ' | sort -u || true)
[[ -z $bad ]] || fail "libraries shipped in the image miss dependencies:"$'\n'"$bad"
for tool in python3 python gcc cc g++ pip; do
    [[ ! -e $root/usr/bin/$tool && ! -e $root/usr/local/bin/$tool ]] || fail "$tool is in the runtime image"
done
runpath=$(readelf -d "$root/usr/local/bin/ddpm-worker" | sed -n 's/.*R\(UN\)\?PATH.*\[\(.*\)\]/\2/p')
[[ $runpath == '$ORIGIN/'* ]] || fail "the binary's runpath is '$runpath', not relative to it"
ok "ldd: the binary and $libs shipped libraries resolve inside the image (runpath $runpath); no Python, no compiler"

# 3. A job through the image's entrypoint.
mkdir -p "$work"/{upper,overlay-work,merged,model}
"$HOST_BIN" init-model --preset tiny --out "$work/model" --seed 3 >/dev/null
chmod -R a+rX "$work"
cat >"$work/inner.sh" <<'INNER'
#!/usr/bin/env bash
# Runs inside `unshare --mount --pid --net --fork`: this shell is PID 1 of the new PID namespace.
set -euo pipefail
root=$1 work=$2 user=$3 workdir=$4; shift 4
merged=$work/merged
ip link set lo up
mount -t overlay overlay -o "lowerdir=$root,upperdir=$work/upper,workdir=$work/overlay-work" "$merged"
mount -t proc proc "$merged/proc"
mount --rbind /dev "$merged/dev"
mkdir -p "$merged/models/tiny"
mount --bind -o ro "$work/model" "$merged/models/tiny"
in_image() { chroot --userspec="$user" "$merged" /usr/bin/env -i -C "$workdir" "${image_env[@]}" "$@"; }
image_env=()
while [[ $1 != -- ]]; do image_env+=("$1"); shift; done
shift
# The image's environment, plus the model and one CPU thread (the samples are then comparable with
# `generate` run with one thread).
image_env+=(DDPM_MODELS=tiny=/models/tiny DDPM_CPU_THREADS=1)
chroot --userspec="$user" "$merged" /usr/bin/env -i -C "$workdir" "${image_env[@]}" "$@" \
    >"$work/serve.out" 2>"$work/serve.log" &
server=$!
for _ in $(seq 1 600); do
    grep -q '^listening on' "$work/serve.out" 2>/dev/null && break
    kill -0 $server 2>/dev/null || { echo "serve exited:"; cat "$work/serve.log"; exit 1; }
    sleep 0.1
done
grep -q '^listening on' "$work/serve.out" || { echo "serve did not listen in 60 s"; cat "$work/serve.log"; exit 1; }
in_image /usr/local/bin/ddpm-worker submit --server http://127.0.0.1:50051 --model tiny --scheduler ddim \
    --steps 8 --num-samples 5 --seed 41 --batch-size 2 --wait --output json >"$work/job.json"
# SIGTERM drains and exits 0.
kill -TERM $server
wait $server || { echo "serve exited with $? after SIGTERM"; exit 1; }
INNER
chmod +x "$work/inner.sh"
unshare --mount --pid --net --fork "$work/inner.sh" "$root" "$work" "${user/:*/}:${user#*:}" "$workdir" \
    "${env[@]}" -- "${entry[@]}" "${cmd[@]}" \
    || { tail -30 "$work/serve.log" 2>/dev/null; fail "the job through the image did not run"; }
grep -q 'SUCCEEDED' "$work/job.json" || fail "the job did not succeed: $(cat "$work/job.json")"
# Outputs written as the image's user under its working directory.
jobs=$work/upper${workdir}/ddpm-data/jobs
manifest=$(find "$jobs" -name manifest.json | head -1)
[[ -f $manifest ]] || fail "no manifest under $jobs"
owner=$(stat -c %u "$manifest")
[[ $owner == "${user%%:*}" ]] || fail "outputs owned by uid $owner, not the image user"
dir=$(dirname "$manifest")
"$PYTHON" tests/readers/check_dataset.py "$dir" >"$work/check.json" \
    || fail "the job's outputs fail tests/readers/check_dataset.py"
ok "the job's index and manifest check out (tests/readers/check_dataset.py: every sample once, every sha256 true)"
OMP_NUM_THREADS=1 "$HOST_BIN" generate --model "$work/model" --scheduler ddim --steps 8 --num-samples 5 \
    --seed 41 --batch-size 2 --out "$work/host" >/dev/null 2>&1 || fail "host generate"
for i in 0 1 2 3 4; do
    name=$(printf 'samples/%08d.png' $i)
    cmp -s "$dir/$name" "$work/host/$name" || fail "$name differs from the host build's generate"
done
ok "a job through the image's entrypoint (cmd: ${cmd[*]}) as uid ${user%%:*}: 5 samples byte-identical to the host build's"
