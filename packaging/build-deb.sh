#!/usr/bin/env bash
# Build edged's .deb packages with debhelper (dpkg-buildpackage; packaging/debian is the debian/
# folder): edged (the daemon: a self-contained venv under /opt/edged/venv, the default
# /etc/edged/edged.toml, the systemd unit, enabled on install) and edged-learn (the onnx package
# the fine-tune worker needs), for one Debian release and architecture:
#
#   packaging/build-deb.sh [--arch amd64|arm64] [--suite bookworm|trixie] [--out DIR] [--lintian]
#
# bookworm (Debian 12) gets CPython 3.11 wheels, trixie (Debian 13) CPython 3.13. The wheels are
# the ones packaging/requirements/SUITE.txt pins, with their sha256 (regenerate it with
# `make lock`); pip downloads them for the target's platform tags, so an arm64 package builds on
# an amd64 machine, and nothing is compiled. $PYTHON (default python3) runs pip; pip's cache
# makes a rebuild quick. Prints the two .deb paths (edged, then edged-learn) on stdout, its steps
# on stderr. --lintian: run lintian on them, and fail on any error.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
suite=bookworm
out=$repo/dist
lintian=no

while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --suite) suite=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --lintian) lintian=yes; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

case "$arch" in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
    *) echo "build-deb.sh: --arch must be amd64 or arm64, not $arch" >&2; exit 2 ;;
esac
# The release's CPython, the newest glibc its wheels may need, the version's release tag.
case "$suite" in
    bookworm) py=3.11 glibc=36 tag=deb12 ;;
    trixie) py=3.13 glibc=41 tag=deb13 ;;
    *) echo "build-deb.sh: --suite must be bookworm or trixie, not $suite" >&2; exit 2 ;;
esac
lock=$here/requirements/$suite.txt
steps=5
[ "$lintian" = yes ] && steps=6
step=0
started=$(date +%s)
say() {
    step=$((step + 1))
    echo "build-deb.sh: [$step/$steps] $* ($(( $(date +%s) - started )) s)" >&2
}

# Absolute: debian/rules runs pip from the source tree's copy.
case "$python" in
    */*) python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python") ;;
    *) python=$(command -v "$python") ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
changelog=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "${changelog%-*}" != "$version" ]; then
    echo "build-deb.sh: packaging/debian/changelog is at $changelog, pyproject.toml at" \
         "$version: add a changelog entry (dch -v $version-1)" >&2
    exit 1
fi

# 1. The source tree dpkg-buildpackage sees: the sources, packaging/debian as debian/, the unit.
say "preparing the source tree for edged $changelog ($suite, $arch)"
src=$work/edged-$version
mkdir -p "$src/models" "$src/docs"
tar -cf - --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md edged hal packaging \
    | tar -xf - -C "$src"
cp -r packaging/debian "$src/debian"
cp packaging/systemd/edged.service "$src/debian/edged.service"
cp docs/operations.md "$src/docs/"
# The example models, for reference only (/var/lib/edged/models starts empty).
cp models/README.md "$src/models/"
for model in models/*/; do
    if [ -f "$model/model.toml" ]; then
        cp -r "$model" "$src/models/"
    fi
done
find "$src/models" -name __pycache__ -prune -exec rm -rf {} +

# 2. The edged wheel, built from that copy (the working tree stays clean).
say "building the edged $version wheel"
if ! "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
        --wheel-dir "$work/edged-wheel" "$src" >"$work/pip.log" 2>&1; then
    cat "$work/pip.log" >&2
    echo "build-deb.sh: could not build the edged wheel (its build backend, setuptools, comes" \
         "from the package index: is it reachable?)" >&2
    exit 1
fi

# 3. The locked wheels for the target: binary wheels only, for its CPython and every manylinux
#    tag from its glibc down to manylinux2014 (glibc 2.17), newest preferred, as pip on the
#    target would choose; --require-hashes: each must match the lock's sha256.
say "downloading the locked wheels for CPython $py on $arch ($lock)"
platforms=()
for minor in $(seq "$glibc" -1 17); do
    platforms+=(--platform "manylinux_2_${minor}_$machine")
done
platforms+=(--platform "manylinux2014_$machine")
wheels=$work/wheels
mkdir -p "$wheels"
if ! "$python" -m pip --isolated download --quiet --disable-pip-version-check \
        --only-binary=:all: --no-deps --require-hashes --python-version "$py" \
        --implementation cp "${platforms[@]}" --dest "$wheels" --requirement "$lock" \
        >"$work/pip.log" 2>&1; then
    cat "$work/pip.log" >&2
    echo "build-deb.sh: could not download the locked wheels for $arch (is the package index" \
         "reachable? does $lock have a wheel with a matching hash for this target?)" >&2
    exit 1
fi
cp "$lock" "$wheels/requirements.txt"

# 4. dpkg-buildpackage: dh, with packaging/build-venv.sh as the install step.
say "dpkg-buildpackage --host-arch $arch (dh; the venv step; xz)"
if ! (cd "$src" && EDGED_PYTHON=$py EDGED_SUITE=$tag EDGED_WHEELS=$wheels \
        EDGED_WHEEL=$(ls "$work"/edged-wheel/edged-*.whl) PIP="$python -m pip" \
        dpkg-buildpackage -b -us -uc --host-arch "$arch" >"$work/build.log" 2>&1); then
    tail -40 "$work/build.log" >&2
    echo "build-deb.sh: dpkg-buildpackage failed (the log's end is above)" >&2
    exit 1
fi
grep '^build-venv.sh:' "$work/build.log" | sed 's/^/    /' >&2

say "collecting the packages"
debs=()
for package in edged edged-learn; do
    deb=${package}_${changelog}~${tag}_${arch}.deb
    mv "$work/$deb" "$out/$deb"
    debs+=("$out/$deb")
    echo "    $out/$deb ($(du -h "$out/$deb" | cut -f1), installed $(dpkg-deb -f "$out/$deb" \
        Installed-Size) KiB)" >&2
done

if [ "$lintian" = yes ]; then
    say "lintian"
    lintian --fail-on error --info "${debs[@]}" >&2
fi
echo "build-deb.sh: done in $(( $(date +%s) - started )) s" >&2
printf '%s\n' "${debs[@]}"
