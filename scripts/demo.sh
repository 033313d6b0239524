#!/usr/bin/env bash
# berth's main job on the local machine, end to end, as an unprivileged user:
#   1. start a throw-away OCI registry on 127.0.0.1 (Debian's docker-registry),
#   2. build a small sample image (busybox) with umoci and push it with skopeo,
#   3. berth pull it (verified, flattened into one SquashFS), list and inspect it,
#   4. berth run a command in it as yourself,
#   5. publish a container template (as the "admin" of a private site config) and submit a
#      batch job with it on the local backend, then show its result and output.
# Usage: scripts/demo.sh [VENV]   (run as a normal user; scripts/quickstart.sh calls it)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-${BERTH_VENV:-$repo/.venv}}
berth="$venv/bin/berth"
work=$(mktemp -d /tmp/berth-demo.XXXXXX)
registry_pid=""
cleanup() {
    [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

# Everything berth writes goes to this demo's own directories.
export BERTH_USER_STORE="$work/store" BERTH_SITE_STORE="$work/site-store"
export BERTH_CONFIG_DIR="$work/etc-berth" BERTH_JOBS_DIR="$work/jobs"
mkdir -p "$BERTH_CONFIG_DIR"

step "starting a local OCI registry on 127.0.0.1"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: $work/registry}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$port}
YML
/usr/bin/docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
/usr/bin/python3 - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("the registry did not start; see its log")
PY
registry="127.0.0.1:$port"
printf '[[registries]]\nhost = "%s"\ninsecure = true\n' "$registry" > "$BERTH_CONFIG_DIR/berth.toml"

step "building a sample image (busybox) and pushing it to $registry/demo/busybox:1"
umoci init --layout "$work/layout"
umoci new --image "$work/layout:1"
umoci unpack --rootless --image "$work/layout:1" "$work/bundle" >/dev/null
rootfs="$work/bundle/rootfs"
mkdir -p "$rootfs"/{bin,etc,home,tmp,proc,dev,sys,root}
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
umoci repack --image "$work/layout:1" "$work/bundle"
umoci config --image "$work/layout:1" --config.cmd /bin/sh --config.env PATH=/bin
skopeo copy -q --dest-tls-verify=false "oci:$work/layout:1" "docker://$registry/demo/busybox:1"

step "berth pull $registry/demo/busybox:1"
"$berth" pull "$registry/demo/busybox:1"

step "berth images"
"$berth" images

step "berth run: a command inside the container, as $(id -un)"
"$berth" run "$registry/demo/busybox:1" sh -c 'echo "hello from $(hostname): uid=$(id -u) gid=$(id -g) home=$HOME"; cat /etc/os-release 2>/dev/null | head -1 || true'

if "$berth" template --help >/dev/null 2>&1 && "$berth" submit --help >/dev/null 2>&1; then
    step "admin: berth template create demo image=$registry/demo/busybox:1 cpu=1 memsz=256M"
    "$berth" template create demo "image=$registry/demo/busybox:1" cpu=1 memsz=256M \
        stop_timeout=5 comment="demo template"
    "$berth" template list

    backend=${BERTH_DEMO_BACKEND:-local}  # slurm: see docs/jobs.md "The Slurm test cluster"
    step "user: berth submit --template demo job.sh ($backend backend)"
    cat > "$work/job.sh" <<'JOB'
#!/bin/sh
#BERTH -J demo-job
echo "job running in the container on $(hostname) as uid $(id -u)"
echo "written by the job in $(pwd)" > out/result.txt
JOB
    mkdir -p "$work/out"
    cd "$work"
    job=$("$berth" submit --backend "$backend" --template demo -o "$work/job.out" job.sh)
    echo "submitted job $job"
    for _ in $(seq 120); do
        state=$("$berth" status "$job" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
        case "$state" in completed|failed|cancelled|timeout) break;; esac
        sleep 0.5
    done
    "$berth" status "$job"
    "$berth" logs "$job"
    [ "$state" = completed ] || { echo "demo job ended $state" >&2; exit 1; }
    echo "file the job wrote to the submit directory, as seen on the host:"
    ls -ln "$work/out/result.txt"; cat "$work/out/result.txt"
fi

step "done: berth pulled, converted, ran and submitted a container job, all unprivileged"
