#!/usr/bin/env bash
# edged's own venv step for debian/rules (override_dh_auto_install): lay out /opt/edged/venv for
# the target's CPython from the locked wheelhouse, without running the target's Python.
#
#   packaging/build-venv.sh --python 3.11 --arch arm64 --wheels DIR --edged-wheel FILE \
#       --base debian/edged --learn debian/edged-learn
#
# 1. pip installs every locked wheel (binary wheels only, hashes checked, no index, no deps
#    resolution: the lock is complete) for the target's platform tags into the venv's
#    site-packages, then the edged wheel; no .pyc (the postinst compiles them with the target's
#    python, as Debian's py3compile does).
# 2. The onnx package (only the fine-tune worker imports it) moves to the edged-learn package.
# 3. Files a gateway never uses are removed: packaging/venv-prune.txt, one glob a line, each
#    with the reason.
# 4. The venv's skeleton: pyvenv.cfg, bin/python -> /usr/bin/python3.X, and the edged and
#    edged-fleet console scripts.
# 5. The substvar edged:Depends: the python3.X and the libc6 the wheels need (the newest
#    manylinux_2_N tag among them).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python_version= arch= wheels= edged_wheel= base= learn=
pip=${PIP:-python3 -m pip}
while [ $# -gt 0 ]; do
    case "$1" in
        --python) python_version=$2; shift 2 ;;
        --arch) arch=$2; shift 2 ;;
        --wheels) wheels=$2; shift 2 ;;
        --edged-wheel) edged_wheel=$2; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --learn) learn=$2; shift 2 ;;
        *) echo "build-venv.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for name in python_version arch wheels edged_wheel base learn; do
    [ -n "${!name}" ] || { echo "build-venv.sh: --${name%%_*} is required" >&2; exit 2; }
done
case "$arch" in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
    *) echo "build-venv.sh: --arch must be amd64 or arm64, not $arch" >&2; exit 2 ;;
esac

py=python$python_version
venv=/opt/edged/venv
site=lib/$py/site-packages
cpython=cp${python_version/./}

echo "build-venv.sh: installing the locked wheels for $cpython $arch into $base$venv" >&2
platforms=()
for tag in $(cd "$wheels" && ls | grep -o "manylinux[_0-9a-z]*_$machine" | sort -u); do
    platforms+=(--platform "$tag")
done
# --isolated: the host's pip configuration (an index, constraints) must not change anything.
# shellcheck disable=SC2086
$pip --isolated install --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
    --only-binary=:all: --no-deps --no-compile --require-hashes \
    --python-version "$python_version" --implementation cp --abi "$cpython" "${platforms[@]}" \
    --target "$base$venv/$site" --requirement "$wheels/requirements.txt"
# shellcheck disable=SC2086
$pip --isolated install --quiet --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$base$venv/$site" "$edged_wheel"
rm -rf "${base:?}$venv/$site/bin"  # console scripts for the host's python: written below

echo "build-venv.sh: onnx into the edged-learn package" >&2
mkdir -p "$learn$venv/$site"
mv "$base$venv/$site"/onnx "$base$venv/$site"/onnx-*.dist-info "$learn$venv/$site/"

echo "build-venv.sh: pruning what a gateway never runs (packaging/venv-prune.txt)" >&2
before=$(du -sk "$base$venv" "$learn$venv" | awk '{s += $1} END {print s}')
grep -v -e '^#' -e '^$' "$here/venv-prune.txt" | while read -r pattern; do
    for root in "$base" "$learn"; do
        # shellcheck disable=SC2086  # the glob expands here
        (cd "$root$venv/$site" && rm -rf -- $pattern)
    done
done
after=$(du -sk "$base$venv" "$learn$venv" | awk '{s += $1} END {print s}')
echo "build-venv.sh: pruned $(( (before - after) / 1024 )) MiB" >&2

# Modes as dh_fixperms would give them: wheels mark some modules executable (protobuf's).
find "$base$venv" "$learn$venv" -type f ! -name '*.so' ! -name '*.so.*' -exec chmod 0644 {} +

mkdir -p "$base$venv/bin"
ln -sf "/usr/bin/$py" "$base$venv/bin/python"
ln -sf python "$base$venv/bin/python3"
ln -sf python "$base$venv/bin/$py"
cat > "$base$venv/pyvenv.cfg" <<CFG
home = /usr/bin
include-system-site-packages = false
version = $python_version
executable = /usr/bin/$py
CFG
for script in edged:edged.cli edged-fleet:edged.fleet; do
    cat > "$base$venv/bin/${script%%:*}" <<PY
#!$venv/bin/python
import sys

from ${script#*:} import main

if __name__ == "__main__":
    sys.exit(main())
PY
    chmod 0755 "$base$venv/bin/${script%%:*}"
done

# The newest glibc any wheel needs: per wheel the oldest of its manylinux tags (a wheel tagged
# manylinux_2_27.manylinux_2_28 runs on 2.27), then the newest over the wheels.
glibc() {
    python3 -c '
import re, sys
need = [min((int(v) for v in re.findall(r"manylinux_2_(\d+)", w)), default=17) for w in sys.argv[1:]]
print(max(need, default=17))' "$@"
}
native="libstdc++6, libgcc-s1"
echo "edged:Depends=$py, python3 (>= $python_version~), libc6 (>= 2.$(glibc "$wheels"/*.whl)), $native" \
    >> "$base/../$(basename "$base").substvars"
echo "edged:Depends=libc6 (>= 2.$(glibc "$wheels"/onnx-*.whl)), $native" \
    >> "$learn/../$(basename "$learn").substvars"
