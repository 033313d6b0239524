#!/usr/bin/env bash
# The demo job of scripts/demo.sh, submitted to a real multi-node Slurm test cluster instead of
# the local backend: starts munged, slurmctld and four slurmd "nodes" on 127.0.0.1 (as root;
# tests/harness/slurm.py), runs the demo as the unprivileged user, and stops the cluster.
# Run after scripts/quickstart.sh (which installs the packages and the virtual environment).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then
    exec sudo -E "$0" "$@"
fi
user=${BERTH_TEST_USER:-berthtest}
if runuser -u "$user" -- test -r "$repo/src/berth/__init__.py"; then
    venv=${BERTH_VENV:-$repo/.venv}
else
    venv=${BERTH_VENV:-/opt/berth-test/venv}
fi
[ -x "$venv/bin/berth" ] || { echo "run scripts/quickstart.sh first ($venv/bin/berth is missing)" >&2; exit 1; }
cluster=$(mktemp -d /tmp/berth-slurm.XXXXXX)
chmod 755 "$cluster"
stop() { cd "$repo" && "$venv/bin/python" -m tests.harness.slurm stop "$cluster" >/dev/null 2>&1 || true; rm -rf "$cluster"; }
trap stop EXIT
cd "$repo"
"$venv/bin/python" -m tests.harness.slurm start "$cluster" >/dev/null
demo="$repo/scripts/demo.sh"
if ! runuser -u "$user" -- test -r "$demo"; then
    demo="$cluster/demo.sh"; cp "$repo/scripts/demo.sh" "$demo"; chmod 755 "$demo"
fi
runuser -u "$user" -- env -i HOME="$(getent passwd "$user" | cut -d: -f6)" USER="$user" \
    PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 SLURM_CONF="$cluster/etc/slurm.conf" \
    BERTH_DEMO_BACKEND=slurm bash "$demo" "$venv"
