#!/usr/bin/env bash
# Run berth's whole test suite: installs the system packages, builds the virtual environment,
# and runs pytest, whose fixtures start every real server the tests need (registry, Slurm
# cluster, ...). Runs as root because it installs packages and starts slurmd; berth itself is
# exercised as the unprivileged user 'berthtest'. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then
    exec sudo -E "$0" "$@"
fi
"$repo/scripts/install-system-packages.sh"
user=${BERTH_TEST_USER:-berthtest}
# The test user must be able to run the installed berth: use the repository's .venv when the
# user can read the repository, else a non-editable install in a world-readable place.
if runuser -u "$user" -- test -r "$repo/src/berth/__init__.py"; then
    venv=${BERTH_VENV:-$repo/.venv}; editable=1
else
    venv=${BERTH_VENV:-/opt/berth-test/venv}; editable=0
fi
BERTH_EDITABLE=$editable "$repo/scripts/setup-venv.sh" "$venv"
export BERTH_VENV=$venv BERTH_TEST_USER=$user BERTH_REQUIRE_ALL=1
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
