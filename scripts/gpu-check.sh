#!/usr/bin/env bash
# Prove berth's GPU support on a real NVIDIA node (issue 13; docs/gpus.md). Self-checking: prints
# PASS/FAIL lines and a block for bench/RESULTS.md, exits non-zero on the first failure.
#
#   scripts/gpu-check.sh --bundle   on a machine with berth's system packages (scripts/
#                                   install-system-packages.sh): puts berth-init, busybox and the
#                                   container tools (runc, squashfuse, fuse-overlayfs, mksquashfs...)
#                                   with their non-glibc libraries into .gpu-check/ (git-ignored;
#                                   ~20 MiB) for a GPU node that has no network to install them;
#   scripts/gpu-check.sh            on the GPU node (as root or a user; carry .gpu-check along):
#     1. berth from this checkout (PYTHONPATH=src, python3 >= 3.11 with urllib3; no pip);
#     2. an image with busybox, the C library and the test programs only: no NVIDIA file;
#     3. `berth run --gpus device=K`: only /dev/nvidiaK appears, CUDA_VISIBLE_DEVICES=0, and
#        `nvidia-smi -L` (the host's, injected) lists exactly GPU K's UUID; more GPUs than the
#        node has is refused;
#     4. a CUDA program runs inside: cuda-burn (driver API + PTX JIT, built with gcc alone) and,
#        when nvcc is present, the same kernel built with nvcc (CUDA runtime);
#     5. the GPU-bound kernel's time bare and in berth, ROUNDS interleaved runs each: medians,
#        ratio; FAIL when berth is more than 3% slower.
# Environment: GPU_CHECK_ITERS (FMAs per thread, default 20000000: about half a second on an
# H100/H200), GPU_CHECK_ROUNDS (default 5), OUT (a directory for gpu-check.txt, optional),
# GPU_CHECK_DEVICES_TOML (more [devices] lines; tests/integration/test_gpus.py runs this script
# on the fake driver tree that way, up to the CUDA program, which needs a real driver).
set -Eeuo pipefail
trap 'echo "FAIL: gpu-check.sh line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
repo=$(cd "$(dirname "$0")/.." && pwd)
bundle=$repo/.gpu-check
iters=${GPU_CHECK_ITERS:-20000000}
rounds=${GPU_CHECK_ROUNDS:-5}

libs_of() {  # the shared libraries a program loads (none for a script), glibc's own left out when $2 = noglibc
    { ldd "$1" 2>/dev/null || true; } | awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}' |
        if [ "${2:-}" = noglibc ]; then grep -Ev '/(libc|libm|libdl|librt|libpthread|ld-linux[^/]*)\.so' || true; else cat; fi
}

if [ "${1:-}" = --bundle ]; then
    rm -rf "$bundle"
    mkdir -p "$bundle/bin" "$bundle/libexec" "$bundle/lib"
    for name in runc squashfuse squashfuse_ll fuse-overlayfs fusermount3 mksquashfs; do
        path=$(command -v "$name") || { echo "skipping $name: not installed here"; continue; }
        cp -L "$path" "$bundle/libexec/$name"
        libs_of "$path" noglibc | while read -r lib; do cp -Ln "$lib" "$bundle/lib/"; done
        # fusermount3 works only installed setuid root (the fuse3 package does that): a copy on
        # PATH would take unmounts away from the node's own, so it waits in libexec for an admin.
        [ "$name" = fusermount3 ] && continue
        printf '#!/bin/sh\nhere=$(dirname "$0")/..\nLD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/libexec/%s" "$@"\n' \
            "$name" > "$bundle/bin/$name"
        chmod 755 "$bundle/bin/$name"
    done
    cp -L /bin/busybox "$bundle/busybox"
    file "$bundle/busybox" | grep -q 'statically linked' || { echo "need busybox-static" >&2; exit 1; }
    gcc -static -Os -o "$bundle/berth-init" "$repo/src/berth/runtime/init/berth-init.c"
    du -sh "$bundle"
    exit 0
fi

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "PASS: $*"; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

# --- 1. tools and berth ---------------------------------------------------------------------
command -v nvidia-smi >/dev/null || fail "nvidia-smi is not on PATH: is this an NVIDIA GPU node?"
[ -d "$bundle/bin" ] && export PATH="$bundle/bin:$PATH"
for tool in gcc python3 runc mksquashfs; do
    command -v "$tool" >/dev/null || fail "$tool is missing (make .gpu-check with --bundle elsewhere and carry it)"
done
command -v squashfuse >/dev/null || command -v squashfuse_ll >/dev/null || fail "squashfuse is missing (--bundle)"
[ -c /dev/fuse ] || fail "/dev/fuse is missing: berth mounts images with FUSE"
if [ "$(id -u)" != 0 ]; then
    fm=$(command -v fusermount3) && [ -u "$fm" ] ||
        fail "no setuid fusermount3 on PATH: an admin installs the fuse3 package (or: install -m 4755 .gpu-check/libexec/fusermount3 /usr/bin/)"
fi
python3 -c 'import sys; assert sys.version_info >= (3, 11)' || fail "python3 is older than 3.11"
work=$(mktemp -d /tmp/berth-gpu-check.XXXXXX)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
if [ -x "$bundle/berth-init" ]; then
    export BERTH_INIT=$bundle/berth-init
else
    gcc -static -Os -o "$work/berth-init" "$repo/src/berth/runtime/init/berth-init.c" ||
        fail "cannot build berth-init statically here (no static libc): make .gpu-check with --bundle"
    export BERTH_INIT=$work/berth-init
fi
export PYTHONPATH=$repo/src BERTH_ALLOW_ROOT=1 BERTH_CONFIG_DIR=$work/etc BERTH_STATE_DIR=$work/state \
    BERTH_USER_STORE=$work/store XDG_CONFIG_HOME=$work/xdg
berth() { timeout 300 python3 -m berth "$@"; }
unset CUDA_VISIBLE_DEVICES  # the check picks its GPU itself
mkdir -p "$work/etc" "$work/xdg"

# The driver's libraries must be in an ld.so cache; some images (containers on GPU clouds) find
# them through LD_LIBRARY_PATH instead: then berth is pointed at a cache made for them.
smi_dir=$(dirname "$(command -v nvidia-smi)")
ld_cache=/etc/ld.so.cache
if ! ldconfig -p | grep -q 'libcuda\.so\.1 '; then
    dirs=""
    for dir in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 \
               ${LD_LIBRARY_PATH//:/ }; do
        [ -e "$dir/libcuda.so.1" ] && dirs="$dirs$dir"$'\n'
    done
    [ -n "$dirs" ] || fail "libcuda.so.1 is neither in the ld.so cache nor in the usual driver directories"
    printf '%s' "$dirs" > "$work/ld.so.conf"
    ldconfig -X -C "$work/ld.so.cache" -f "$work/ld.so.conf"
    ld_cache=$work/ld.so.cache
fi
cat > "$work/etc/berth.toml" <<EOF
[devices]
ld_cache = "$ld_cache"
bin_dirs = ["$smi_dir", "/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin", "/sbin"]
${GPU_CHECK_DEVICES_TOML:-}
EOF
berth doctor | grep -E '^(OK|WARN|FAIL) +GPUs' || true

# --- 2. an image without NVIDIA files ---------------------------------------------------------
gcc -O2 -o "$work/cuda-burn" "$repo/scripts/gpu-check/cuda-burn.c" -ldl -lm
programs=("$work/cuda-burn")
if command -v nvcc >/dev/null; then
    nvcc -O2 -o "$work/cuda-burn-rt" "$repo/scripts/gpu-check/cuda-burn-rt.cu"
    programs+=("$work/cuda-burn-rt")
fi
root=$work/rootfs
mkdir -p "$root"/{bin,usr/bin,etc,proc,sys,dev,tmp,home,root,work}
busybox=$bundle/busybox
[ -x "$busybox" ] || busybox=$(command -v busybox) || fail "busybox is missing (--bundle)"
cp -L "$busybox" "$root/bin/busybox"
for applet in sh ls cat grep echo wc; do ln -s busybox "$root/bin/$applet"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\n' > "$root/etc/group"
cp "${programs[@]}" "$root/usr/bin/"
# The C library pieces that the programs, the injected nvidia-smi and the driver itself load.
libcuda=$(ldconfig -C "$ld_cache" -p | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')
for program in "${programs[@]}" "$(command -v nvidia-smi)" $libcuda; do
    libs_of "$program" | { grep -Ev 'nvidia|libcuda' || true; } | while read -r lib; do cp -Ln --parents "$lib" "$root"; done
done
found=$(find "$root" \( -iname '*nvidia*' -o -iname 'libcuda*' \) -print)
[ -z "$found" ] || fail "the test image holds NVIDIA files: $found"
mksquashfs "$root" "$work/image.sqfs" -all-root -noappend -quiet -no-progress >/dev/null
image=$work/image.sqfs
pass "an image without NVIDIA files ($(du -k "$image" | cut -f1) KiB)"

# --- 3. exactly the selected GPU ----------------------------------------------------------------
count=$(nvidia-smi -L | grep -c '^GPU ')
gpu=$((count - 1))   # the last one: with several GPUs, renumbering shows
uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i "$gpu")
select=$uuid  # by UUID when the driver's /proc files map UUIDs to devices, else by index
ls /proc/driver/nvidia/gpus/*/information >/dev/null 2>&1 || [ -n "${GPU_CHECK_DEVICES_TOML:-}" ] || select=device=$gpu
inside=$(berth run --gpus "$select" "$image" /bin/sh -c \
    'ls /dev | grep "^nvidia[0-9]"; echo "CVD=$CUDA_VISIBLE_DEVICES"; nvidia-smi -L') || fail "berth run --gpus: $inside"
echo "$inside" | sed 's/^/    inside: /'
[ "$(echo "$inside" | grep -c '^nvidia[0-9]')" = 1 ] || fail "not exactly one /dev/nvidiaN inside"
echo "$inside" | grep -qx 'CVD=0' || fail "CUDA_VISIBLE_DEVICES is not renumbered to 0 inside"
[ "$(echo "$inside" | grep -c '^GPU ')" = 1 ] || fail "nvidia-smi -L inside does not list exactly one GPU"
echo "$inside" | grep '^GPU ' | grep -q "$uuid" || fail "nvidia-smi -L inside does not list GPU $gpu ($uuid)"
pass "nvidia-smi -L inside lists exactly GPU $gpu ($uuid) of $count (--gpus $select)"
refused=$(berth run --gpus "$((count + 1))" "$image" /bin/true 2>&1) && fail "--gpus $((count + 1)) was not refused"
echo "$refused" | grep -q "only $count GPU(s)" || fail "--gpus $((count + 1)): unexpected message: $refused"
pass "--gpus $((count + 1)) is refused: $(echo "$refused" | head -1)"

# --- 4 and 5. CUDA inside, and a GPU-bound kernel's time bare and in berth ---------------------
bare_ms="" berth_ms=""
for round in $(seq "$rounds"); do
    out=$(CUDA_VISIBLE_DEVICES=$gpu "$work/cuda-burn" "$iters" 1) || fail "cuda-burn bare: $out"
    bare_ms="$bare_ms ${out##*kernel_ms=}"
    out=$(berth run --gpus "device=$gpu" "$image" /usr/bin/cuda-burn "$iters" 1) || fail "cuda-burn in berth: $out"
    berth_ms="$berth_ms ${out##*kernel_ms=}"
    [ "$round" = 1 ] && pass "a CUDA program (driver API, PTX JIT) runs inside: $out"
done
if [ -x "$work/cuda-burn-rt" ]; then
    out=$(berth run --gpus "device=$gpu" "$image" /usr/bin/cuda-burn-rt "$iters") || fail "cuda-burn-rt in berth: $out"
    pass "nvcc's build (CUDA runtime, static cudart) runs inside: $out"
fi
bare=$(echo "$bare_ms" | median)
inner=$(echo "$berth_ms" | median)
ratio=$(awk -v a="$inner" -v b="$bare" 'BEGIN {printf "%.4f", a / b}')
summary="GPU-bound kernel ($iters FMAs/thread), $rounds runs each: bare median $bare ms [$bare_ms ], berth median $inner ms [$berth_ms ], berth/bare $ratio"
echo "$summary"
{
    echo "gpu-check $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname): $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader -i "$gpu")"
    echo "$summary"
} > "$work/gpu-check.txt"
[ -n "${OUT:-}" ] && cp "$work/gpu-check.txt" "$OUT/"
awk -v r="$ratio" 'BEGIN {exit !(r <= 1.03)}' || fail "berth is more than 3% slower than bare ($ratio)"
pass "kernel time in berth is within 3% of bare ($ratio)"
