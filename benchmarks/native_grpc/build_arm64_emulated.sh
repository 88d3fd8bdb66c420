#!/usr/bin/env bash
# The arm64 build cost of the native echo server, measured: unpack a Debian 12 arm64 root
# filesystem (tests/e2e/debian_rootfs.sh bookworm arm64: debootstrap, qemu-user-static), install
# the toolchain and grpc++ -dev packages from Debian inside it, and run build.sh there under
# qemu-user emulation. Prints the wall and CPU times of both steps; the arm64 binary is left in
# WORK/src/benchmarks/native_grpc/build/echo_server. Needs root, qemu-user-static with
# binfmt_misc, and Debian's package mirror. Not part of `make test`.
#
#   benchmarks/native_grpc/build_arm64_emulated.sh [WORK]      # WORK: default a fresh mktemp -d
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=${1:-$(mktemp -d)}
tarball=$("$root/tests/e2e/debian_rootfs.sh" bookworm arm64)
chroot_dir=$work/root
mkdir -p "$chroot_dir"
[ -x "$chroot_dir/bin/sh" ] || tar -C "$chroot_dir" -xf "$tarball"
cp /etc/resolv.conf "$chroot_dir/etc/resolv.conf"
mkdir -p "$chroot_dir/src/benchmarks/native_grpc"
cp -r "$root/protos" "$chroot_dir/src/"
cp "$here/build.sh" "$here/echo_server.cc" "$chroot_dir/src/benchmarks/native_grpc/"
mount --bind /proc "$chroot_dir/proc"
trap 'umount "$chroot_dir/proc"' EXIT
timed() { /usr/bin/time -f "$1: %e s wall, %U s user, %S s system" chroot "$chroot_dir" sh -c "$2"; }
timed "apt-get install (emulated)" 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends g++ pkg-config libgrpc++-dev libprotobuf-dev \
    protobuf-compiler protobuf-compiler-grpc >/dev/null'
timed "build.sh (emulated)" 'cd /src && benchmarks/native_grpc/build.sh'
chroot "$chroot_dir" dpkg-query -W -f='${Package} ${Version} ${Installed-Size} KiB\n' \
    libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libre2-9 libc-ares2
