#!/usr/bin/env bash
# Install the Debian 12 packages berth and its test bed need, by name. Run as root (or via sudo).
# Idempotent: re-running installs nothing new. Also makes /dev/fuse usable by non-root users
# (a fresh machine may have it 0600; Debian's default is 0666) and creates the unprivileged
# test user the integration tests run berth as.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    exec sudo -E "$0" "$@"
fi

RUNTIME_PACKAGES=(
    runc crun squashfuse squashfs-tools squashfs-tools-ng fuse-overlayfs fuse3 uidmap isal pigz zstd xz-utils
    python3 python3-venv gcc libc6-dev procps util-linux
)
TEST_PACKAGES=(
    docker-registry skopeo umoci busybox-static debootstrap apache2-utils
    slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev libpmix-dev libpmi2-0-dev
    mpich libmpich-dev
    iproute2 psmisc ca-certificates strace
    btrfs-progs  # a state directory on btrfs (tests/integration/test_plan_cache.py: its locks' devices)
)
BENCH_PACKAGES=(bubblewrap charliecloud python3-requests hyperfine podman time openssl)

want=("${RUNTIME_PACKAGES[@]}" "${TEST_PACKAGES[@]}")
if [ "${BERTH_BENCH:-0}" = 1 ]; then want+=("${BENCH_PACKAGES[@]}"); fi

missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d keeps the daemons (slurm, munge, registry) from starting: the harness starts them.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Non-root FUSE (squashfuse, fuse-overlayfs) needs /dev/fuse readable and writable by all.
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    chmod 0666 /dev/fuse
fi

# The unprivileged users the integration tests and the quick start run berth as: the main test
# user, and a second one for the multi-user tests (one user must not read, lock or squat what
# belongs to another). Default Debian homes (mode 0755), as on a real site.
user=${BERTH_TEST_USER:-berthtest}
other=${BERTH_TEST_OTHER_USER:-berthtest2}
for u in "$user" "$other"; do
    if ! id "$u" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash "$u"
    fi
done
