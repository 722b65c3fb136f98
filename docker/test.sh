#!/usr/bin/env bash
# Build docker/Dockerfile for real and run in the image what a user runs (`make docker-test`).
#
#   bash docker/test.sh
#
# No container registry is needed: a Docker engine from Debian packages (started here with its own data
# root, stopped and removed at the end), a Debian bookworm root file system from the apt mirror
# (debootstrap) imported as the base, the Python and torch/torchvision versions of the Dockerfile's default
# BASE installed on it from the package index, then docker/Dockerfile built on that with --build-arg BASE=.
# In the image, without network: generate a small Cdiscount set, repack it, `train/run.sh demo` for a few
# steps on the CPU, predict, `python -m tools.bench --help`; the outputs land in the /data and /runs volumes.
#
# Exit status: 0 passed; 1 failed (the message says at which step); 77 the test cannot run on this machine
# (no apt-get/root to install docker.io and debootstrap, dockerd does not start, the mirror is unreachable):
# nothing was tested.
# Environment: DOCKER_TEST_DIR (work directory, default a new one under /var/tmp; removed at the end),
# DOCKER_TEST_KEEP=1 (keep it and leave the daemon running, for debugging), DEBIAN_MIRROR (default: the one
# apt uses).
set -euo pipefail
# (the whole script is one function, read before it runs: editing this file cannot change a running test)
main() {
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
EXIT_UNAVAILABLE=77
IMAGE=cdiscount-trainer:docker-test
t_start=$(date +%s)

say() { printf '\n== docker-test: %s\n' "$*"; }
unavailable() {
    printf 'docker-test: NOT RUN: %s\n(exit %s: nothing was tested on this machine)\n' "$*" "$EXIT_UNAVAILABLE" >&2
    exit "$EXIT_UNAVAILABLE"
}
fail() { printf 'docker-test: FAILED: %s\n' "$*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - $1 )); }

# ---- the tools: docker.io, containerd, runc, iptables, debootstrap --------------------------------------
have_tools() { command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v containerd >/dev/null; }
if ! have_tools; then
    [ "$(id -u)" = 0 ] || unavailable "dockerd/debootstrap are not installed and installing them needs root"
    command -v apt-get >/dev/null || unavailable "dockerd/debootstrap are not installed and there is no apt-get"
    say "installing docker.io containerd runc iptables debootstrap (apt)"
    t=$(date +%s)
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io containerd runc iptables debootstrap >/dev/null; } \
        || unavailable "apt-get could not install docker.io containerd runc iptables debootstrap"
    echo "apt: $(elapsed "$t") s"
    have_tools || unavailable "dockerd/debootstrap still missing after apt-get install"
fi
[ "$(id -u)" = 0 ] || unavailable "dockerd and debootstrap need root"
# the client of the same package as the daemon (another `docker` earlier on PATH may be newer)
DOCKER=$(dirname "$(command -v dockerd)")/../bin/docker
[ -x "$DOCKER" ] || DOCKER=$(command -v docker) || unavailable "no docker client"

# ---- a private daemon -----------------------------------------------------------------------------------
WORK=${DOCKER_TEST_DIR:-$(mktemp -d /var/tmp/cdiscount-docker-test.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export DOCKER_HOST="unix://$WORK/docker.sock"
export DOCKER_BUILDKIT=0  # the classic builder of the daemon's own version; no buildx plugin needed
dockerd_pid=""
cleanup() {
    local rc=$?
    if [ "${DOCKER_TEST_KEEP:-0}" = 1 ]; then
        echo "docker-test: kept $WORK; daemon pid ${dockerd_pid:-none} (DOCKER_HOST=$DOCKER_HOST)" >&2
        return
    fi
    if [ -n "$dockerd_pid" ] && kill -0 "$dockerd_pid" 2>/dev/null; then
        # the daemon and the containerd it started (its child), which may outlive it for a moment
        local pids="$dockerd_pid $(ps -o pid= --ppid "$dockerd_pid" 2>/dev/null | tr -d ' ' | tr '\n' ' ')" p
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        for p in $pids; do
            for _ in $(seq 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
        done
        wait "$dockerd_pid" 2>/dev/null || true
    fi
    # whatever the daemon left mounted below WORK, deepest first, then the files
    findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting dockerd (data in $WORK)"
t=$(date +%s)
dockerd --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" -H "$DOCKER_HOST" \
    --iptables=false --bridge=none >"$WORK/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 120); do
    "$DOCKER" version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || break
    sleep 0.25
done
if ! "$DOCKER" version >/dev/null 2>&1; then
    tail -n 20 "$WORK/dockerd.log" >&2
    unavailable "dockerd did not start (log above)"
fi
driver=$("$DOCKER" info --format '{{.Driver}}')
echo "dockerd up in $(elapsed "$t") s, storage driver $driver"

# ---- the base image: bookworm + the Python and torch of the Dockerfile's default BASE --------------------
# ARG BASE=pytorch/pytorch:<torch>-cuda<X.Y>-cudnn<N>-runtime; torchvision 0.(minor+15).patch goes with torch 2.minor.patch
default_base=$(sed -n 's/^ARG BASE=//p' "$ROOT/docker/Dockerfile")
torch_v=$(printf '%s' "$default_base" | sed -n 's/^pytorch\/pytorch:\([0-9]*\.[0-9]*\.[0-9]*\)-.*/\1/p')
[ -n "$torch_v" ] || fail "cannot read the torch version from ARG BASE=$default_base in docker/Dockerfile"
IFS=. read -r t_major t_minor t_patch <<<"$torch_v"
[ "$t_major" = 2 ] || fail "torch $torch_v: only torch 2.x has a known torchvision version here"
tv_v="0.$((t_minor + 15)).$t_patch"

mirror=${DEBIAN_MIRROR:-$(
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } | grep -v security | head -n 1 || true)}
mirror=${mirror:-http://deb.debian.org/debian}
say "debootstrap bookworm (python3) from $mirror"
t=$(date +%s)
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
        "$mirror" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 20 "$WORK/debootstrap.log" >&2
    unavailable "debootstrap from $mirror failed (log above)"
fi
tar -C "$WORK/rootfs" -c . | "$DOCKER" import - docker-test/bookworm >/dev/null
rm -rf "$WORK/rootfs"
echo "debootstrap + import: $(elapsed "$t") s"

say "base image: venv with torch $torch_v, torchvision $tv_v (as in $default_base)"
t=$(date +%s)
ctx="$WORK/base-context"
mkdir -p "$ctx"
# The machine's own CA certificates (a TLS-inspecting proxy's, say), for pip inside the build; they exist in
# this temporary context only.
certs=$(find /usr/local/share/ca-certificates -maxdepth 1 -name '*.crt' 2>/dev/null || true)
{
    echo "FROM docker-test/bookworm"
    if [ -n "$certs" ]; then
        # shellcheck disable=SC2086
        cp $certs "$ctx/"
        echo "COPY *.crt /usr/local/share/ca-certificates/"
        echo "RUN update-ca-certificates >/dev/null"
    fi
    echo "ENV PATH=/opt/venv/bin:\$PATH PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1"
    echo "RUN python3 -m venv /opt/venv && pip install -q torch==$torch_v torchvision==$tv_v"
} >"$ctx/Dockerfile"
"$DOCKER" build -q --network=host -t docker-test/torch "$ctx" >"$WORK/base-build.log" 2>&1 \
    || { tail -n 30 "$WORK/base-build.log" >&2; fail "building the base image (log above)"; }
echo "base image: $(elapsed "$t") s"

# ---- the project's image --------------------------------------------------------------------------------
say "docker build -f docker/Dockerfile --build-arg BASE=docker-test/torch"
t=$(date +%s)
(cd "$ROOT" && "$DOCKER" build --network=host -f docker/Dockerfile --build-arg BASE=docker-test/torch \
    -t "$IMAGE" .) >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; fail "docker build (log above)"; }
build_s=$(elapsed "$t")
base_size=$("$DOCKER" image inspect -f '{{.Size}}' docker-test/torch)
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
gib() { awk -v b="$1" 'BEGIN { printf "%.2f GiB", b / 2^30 }'; }
echo "project image: built in $build_s s; $(gib "$size") in all, the Dockerfile's layers $(gib $((size - base_size)))"

# ---- what a user runs, in the image, without network ------------------------------------------------------
say "in the image: make_synthetic, repack, train/run.sh demo, predict, tools.bench --help"
t=$(date +%s)
mkdir -p "$WORK/vol/data" "$WORK/vol/runs"
"$DOCKER" run --rm --network=none --ipc=host -v "$WORK/vol/data:/data" -v "$WORK/vol/runs:/runs" "$IMAGE" \
    bash -euxc '
python -c "import torch, torchvision, timm, nvidia.dali as dali; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__, \"timm\", timm.__version__, \"dali\", dali.__version__)"
python -m tools.make_synthetic --out /data/raw --products 300 --test-products 40 --categories 5 --seed 0
python -m tools.repack --bson /data/raw/train.bson --categories /data/raw/category_names.csv --out /data/repacked \
    --val-fraction 0.2 --workers 2 --quiet
train/run.sh demo --data /data/repacked data.crop=64 data.batch_size=8 train.max_steps=8 \
    train.log_every=4 early_stop.after_epoch=null train.tensorboard=false  # RUN: runs/demo, the /runs volume
python -m tools.predict --bson /data/raw/test.bson --checkpoint /runs/demo/best.pt --out /data/submission.csv \
    --labels /data/raw/test_answers.csv
python -m tools.bench --help >/dev/null
train/run.sh --help >/dev/null
' 2>&1 | tee "$WORK/run.log" || fail "a command in the image failed (output above)"
run_s=$(elapsed "$t")

# the outputs are on the host, in the volumes
for f in runs/demo/last.pt runs/demo/best.pt runs/demo/metrics.jsonl data/repacked/manifest.json data/submission.csv; do
    [ -s "$WORK/vol/$f" ] || fail "the run in the image left no $f in its volume"
done
rows=$(($(wc -l <"$WORK/vol/data/submission.csv") - 1))
[ "$rows" = 40 ] || fail "submission.csv has $rows rows, not one per test product (40)"
grep -q '"step": 8' "$WORK/vol/runs/demo/metrics.jsonl" || fail "metrics.jsonl has no record of step 8"

say "passed in $(elapsed "$t_start") s (project image build $build_s s, $(gib "$size"), the run in it $run_s s)"
}
main "$@"
