#!/usr/bin/env bash
# One command for a newcomer on a fresh Debian 12 machine: install the system packages (root,
# via sudo when needed), build the virtual environment with berth, then run berth's main job
# (scripts/demo.sh) as an unprivileged user: the calling user, or the test user 'berthtest'
# when this is run as root.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
"$repo/scripts/install-system-packages.sh"
user=${BERTH_TEST_USER:-berthtest}
if [ "$(id -u)" -eq 0 ]; then
    if runuser -u "$user" -- test -r "$repo/src/berth/__init__.py"; then
        venv=${BERTH_VENV:-$repo/.venv}; editable=1
    else
        venv=${BERTH_VENV:-/opt/berth-test/venv}; editable=0
    fi
    BERTH_EDITABLE=$editable "$repo/scripts/setup-venv.sh" "$venv"
    # The demo must be readable by the unprivileged user: run a copy from /tmp when needed.
    demo="$repo/scripts/demo.sh"
    if ! runuser -u "$user" -- test -r "$demo"; then
        demo=$(mktemp /tmp/berth-demo-XXXXXX.sh); cp "$repo/scripts/demo.sh" "$demo"; chmod 755 "$demo"
    fi
    status=0
    runuser -u "$user" -- env -i HOME="$(getent passwd "$user" | cut -d: -f6)" USER="$user" \
        PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 bash "$demo" "$venv" || status=$?
    [ "$demo" = "$repo/scripts/demo.sh" ] || rm -f "$demo"  # the copy in /tmp goes with the run
    exit "$status"
else
    "$repo/scripts/setup-venv.sh"
    exec "$repo/scripts/demo.sh"
fi
