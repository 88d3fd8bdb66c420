#!/usr/bin/env bash
# Build edged_<version>_<arch>.deb with dpkg-deb: the edged wheel, a wheelhouse of every runtime
# dependency ([project] dependencies of pyproject.toml, no extras) for CPython 3.11 on the target
# architecture, the default /etc/edged/edged.toml, the systemd unit and the maintainer scripts.
#
#   packaging/build-deb.sh [--arch amd64|arm64] [--out DIR] [--glibc 2.36]
#
# The wheels come from the package index (pip download --only-binary=:all: for the target's
# platform tags), so an arm64 package builds on an amd64 machine. Nothing is compiled. $PYTHON
# (default python3, 3.11 or later) runs pip; pip's cache makes a rebuild quick.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
out=$repo/dist
# The newest glibc the wheels may need: Debian 12 (bookworm) has 2.36. The control file's
# libc6 dependency is the newest manylinux tag actually picked, which is usually older.
glibc=2.36

while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --glibc) glibc=$2; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

case "$arch" in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
    *) echo "build-deb.sh: --arch must be amd64 or arm64, not $arch" >&2; exit 2 ;;
esac

started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
wheels=$root/opt/edged/wheels
mkdir -p "$wheels" "$out"

cd "$repo"
version=$("$python" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
"$python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > "$work/requirements.txt"

# 1. The edged wheel, built from a copy of the sources (the working tree stays clean).
mkdir "$work/src"
tar -cf - --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md edged hal \
    | tar -xf - -C "$work/src"
echo "build-deb.sh: building the edged $version wheel" >&2
if ! "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$wheels" \
        "$work/src"; then
    echo "build-deb.sh: could not build the edged wheel (its build backend, setuptools, comes" \
         "from the package index: is it reachable? pip's error is above)" >&2
    exit 1
fi

# 2. The runtime dependencies for the target: binary wheels only, for CPython 3.11 and every
#    manylinux tag from glibc $glibc down to manylinux2014 (glibc 2.17), newest preferred, as
#    pip on the target itself would choose.
platforms=()
for minor in $(seq "${glibc#2.}" -1 17); do
    platforms+=(--platform "manylinux_2_${minor}_$machine")
done
platforms+=(--platform "manylinux2014_$machine")
echo "build-deb.sh: downloading the runtime wheels for $arch (CPython 3.11)" >&2
if ! "$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --python-version 3.11 --implementation cp "${platforms[@]}" \
        --dest "$wheels" --requirement "$work/requirements.txt"; then
    echo "build-deb.sh: could not download the runtime wheels for $arch from the package" \
         "index (is it reachable? pip's error is above)" >&2
    exit 1
fi
if ls "$wheels" | grep -v '\.whl$' >/dev/null; then
    echo "build-deb.sh: the wheelhouse holds something that is not a wheel:" >&2
    ls "$wheels" | grep -v '\.whl$' >&2
    exit 1
fi
# The libc6 the wheels need: the newest manylinux_2_N tag among them (manylinux2014 is 2.17).
needed_glibc=$(ls "$wheels" | grep -o 'manylinux_2_[0-9]*' | sed 's/manylinux_2_//' \
    | sort -n | tail -1)
needed_glibc=2.${needed_glibc:-17}

# 3. The files.
install -D -m 0644 packaging/edged.toml "$root/etc/edged/edged.toml"
install -D -m 0644 packaging/systemd/edged.service "$root/lib/systemd/system/edged.service"
install -D -m 0755 packaging/install-venv.sh "$root/usr/lib/edged/install-venv.sh"
install -D -m 0644 packaging/debian/copyright "$root/usr/share/doc/edged/copyright"
install -D -m 0644 README.md "$root/usr/share/doc/edged/README.md"
install -D -m 0644 docs/operations.md "$root/usr/share/doc/edged/operations.md"
# The example models, for reference only: /var/lib/edged/models starts empty.
mkdir -p "$root/usr/share/edged/models"
install -m 0644 models/README.md "$root/usr/share/edged/models/README.md"
for model in models/*/; do
    if [ -f "$model/model.toml" ]; then
        cp -r "$model" "$root/usr/share/edged/models/"
    fi
done
find "$root/usr/share/edged/models" -name __pycache__ -prune -exec rm -rf {} +

# 4. The control area.
mkdir -p "$root/DEBIAN"
installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@GLIBC@/$needed_glibc/" \
    -e "s/@INSTALLED_SIZE@/$installed_size/" packaging/debian/control.in > "$root/DEBIAN/control"
install -m 0644 packaging/debian/conffiles "$root/DEBIAN/conffiles"
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm \
    "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/md5sums"
chmod -R u+rwX,go+rX,go-w "$root"

deb=$out/edged_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz -z6 --build "$root" "$deb" >/dev/null
echo "build-deb.sh: $deb ($(du -h "$deb" | cut -f1), $(( $(date +%s) - started )) s)" >&2
echo "$deb"
