#!/bin/sh
# Create edged's virtual environment from the wheelhouse the .deb ships: no network, no index.
# The .deb installs this as /usr/lib/edged/install-venv.sh and its postinst runs it with the
# defaults; tests run it with other folders.
#
#   install-venv.sh [--wheels DIR] [--venv DIR] [--python PYTHON]
#
# The venv is made afresh each time (an upgrade replaces it whole); /var/lib/edged is not touched.
set -eu

wheels=/opt/edged/wheels
venv=/opt/edged/venv
python=python3

while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels=$2; shift 2 ;;
        --venv) venv=$2; shift 2 ;;
        --python) python=$2; shift 2 ;;
        *) echo "install-venv.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

if ! ls "$wheels"/edged-*.whl >/dev/null 2>&1; then
    echo "install-venv.sh: no edged wheel in $wheels" >&2
    exit 1
fi

rm -rf "$venv"
"$python" -m venv "$venv"
# --isolated: ignore the host's pip configuration and PIP_* variables (an index URL or
# constraints there must not change what gets installed); --no-index: only the wheelhouse.
"$venv/bin/python" -m pip --isolated install --quiet --no-index --no-cache-dir \
    --disable-pip-version-check --find-links "$wheels" edged
"$venv/bin/edged" --version
