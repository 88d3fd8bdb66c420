#!/usr/bin/env bash
# Build (once) and cache a minimal Debian root filesystem for the install-and-serve tests:
#
#   tests/e2e/debian_rootfs.sh SUITE ARCH [CACHE_DIR]    # prints the tarball's path
#
# SUITE is bookworm (Debian 12) or trixie (Debian 13), ARCH amd64 or arm64. The tarball,
# CACHE_DIR/rootfs-SUITE-ARCH.tar (default /var/cache/edged-test), holds a debootstrap minbase
# with python3, python3-venv and adduser: what the edged .deb depends on. A foreign architecture
# bootstraps with --foreign and runs the second stage under qemu-user-static (binfmt_misc must
# be mounted and qemu-aarch64 registered). Built in a temporary folder and renamed into place,
# so an interrupted build leaves no half tarball; a present tarball is reused as is. Concurrent
# callers (several test sessions) build it once: the build runs under an flock on
# CACHE_DIR/.rootfs-SUITE-ARCH.lock, and a caller that waited finds the tarball made.
set -euo pipefail

suite=${1:?suite}
arch=${2:?arch}
cache=${3:-${EDGED_TEST_CACHE:-/var/cache/edged-test}}
mirror=${EDGED_TEST_MIRROR:-http://deb.debian.org/debian}
tarball=$cache/rootfs-$suite-$arch.tar

if [ -f "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
mkdir -p "$cache"
exec 9>>"$cache/.rootfs-$suite-$arch.lock"
flock 9
if [ -f "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
work=$(mktemp -d "$cache/.build-$suite-$arch.XXXXXX")
trap 'umount -R "$work/root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
root=$work/root
include=python3,python3-venv,adduser
host_arch=$(dpkg --print-architecture)
started=$(date +%s)
echo "debian_rootfs.sh: debootstrap $suite $arch into $root (minutes; under emulation many)" >&2
if [ "$arch" = "$host_arch" ]; then
    debootstrap --variant=minbase --include="$include" --arch "$arch" "$suite" "$root" "$mirror" \
        > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
else
    debootstrap --foreign --variant=minbase --include="$include" --arch "$arch" "$suite" "$root" \
        "$mirror" > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
    echo "debian_rootfs.sh: second stage under qemu ($(( $(date +%s) - started )) s so far)" >&2
    chroot "$root" /debootstrap/debootstrap --second-stage >> "$work/debootstrap.log" 2>&1 \
        || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
fi
# No package cache or lists in the tarball: the tests install from the .deb alone.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar --numeric-owner -C "$root" -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$tarball"
echo "debian_rootfs.sh: $tarball ($(du -h "$tarball" | cut -f1), $(( $(date +%s) - started )) s)" >&2
echo "$tarball"
