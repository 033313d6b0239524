#!/usr/bin/env bash
# Create the Python virtual environment with berth installed. The package build (setup.py)
# compiles berth-init, the static init every container starts with, into the package (needs gcc
# and libc6-dev, which scripts/install-system-packages.sh installs).
# Usage: scripts/setup-venv.sh [VENV_DIR]   (default: .venv in the repository)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-${BERTH_VENV:-$repo/.venv}}
extras=${BERTH_EXTRAS:-test}
editable=${BERTH_EDITABLE:-1}

if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
# obstore (berth's S3 client) is compiled Rust: take its binary wheel or fail here with pip's
# "no matching distribution", never start a Rust build from its source archive on a node.
if [ "$editable" = 1 ]; then
    "$venv/bin/python" -m pip install -q --only-binary obstore -e "$repo[$extras]"
else
    "$venv/bin/python" -m pip install -q --only-binary obstore "$repo[$extras]"
fi
# berth-init used to be built here; the package has it now (an old copy would only mislead).
rm -rf "$venv/libexec/berth"
# Byte-compile the sources now: with an editable install they live in the repository, and an
# unprivileged user who cannot write __pycache__ there would recompile them on every `berth run`.
if [ "$editable" = 1 ]; then
    "$venv/bin/python" -m compileall -q "$repo/src" >/dev/null || true
    chmod -R a+rX "$repo/src"
fi
chmod -R a+rX "$venv"
echo "berth installed in $venv (run $venv/bin/berth)"
